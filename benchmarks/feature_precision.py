"""Why score-norm features are computed in float32 everywhere: what bf16 does to them.

    python benchmarks/feature_precision.py --manifest benchmark/manifest.json --cache CACHE \\
        [--model MODEL] [--scans-per-split 2] [--out results/feature_precision.json]

For the first scans of the healthy and lesioned test splits and the healthy LOAO split, the
whole-brain score norms of the model's score network are computed twice on this machine's
CPU: in float32 (what ``inference.compute_features`` does on every device) and under bf16
autocast (what a mixed-precision GPU pass, or a CPU with native bf16 instructions, would
do). Reported per scan: both times, the largest relative change of the L norms, and the
MSMA typicality score, percentile and verdict of each. No threshold is set; verdicts are the
model's own.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohort_args import cohort_parser, exit_with, refuse_existing_output  # noqa: E402

from SpatialMSMALib.dataset import manifest_scans, model_space  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import write_text_atomically  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402
from SpatialMSMALib.score.features import score_norm_features  # noqa: E402

SPLITS = ("test_healthy", "test_lesioned", "loao_healthy")


def whole_norms(model, scan, bf16: bool) -> tuple[np.ndarray, float]:
    """``(L,)`` whole-brain score norms of one model-space scan on the CPU, and seconds."""
    f = model.features
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, whole = score_norm_features(model.score_net.eval(), torch.from_numpy(scan.image),
                                       torch.as_tensor(model.sigmas, dtype=torch.float32),
                                       f.neighbourhood, f.sigmas_per_pass,
                                       mask=scan.brain_mask, margin=f.margin)
    return whole.float().numpy(), time.perf_counter() - start


def main() -> None:
    parser = cohort_parser(__doc__.splitlines()[0])
    parser.add_argument("--scans-per-split", type=int, default=2)
    args = parser.parse_args()
    try:
        refuse_existing_output(args)
        model = AnomalyModel.load(args.model)
        if model.typicality is None:
            raise InputError(f"'{args.model}' carries no MSMA typicality model")
        rows = manifest_scans(args.manifest, SPLITS)
    except InputError as e:
        exit_with(e)
    selected = [r for split in SPLITS for r in rows[split][: args.scans_per_split]]
    scans = model_space(selected, args.cache, model.spacing_mm, demons=model.demons,
                        version=model.preprocess_version, channels=len(model.channel_names))
    records = []
    for scan in scans:
        record = {"id": scan.id}
        norms = {}
        for name, bf16 in (("float32", False), ("bf16", True)):
            norms[name], seconds = whole_norms(model, scan, bf16)
            verdict = model.typicality.assess(norms[name][None])[0].to_dict()
            record[name] = {"seconds": round(seconds, 2), "score": verdict["score"],
                            "percentile": verdict["percentile"],
                            "verdict": verdict["verdict"]}
        record["max_relative_change"] = float(np.abs(norms["bf16"] / norms["float32"] - 1).max())
        records.append(record)
        print(json.dumps(record), flush=True)
    changed = sum(r["bf16"]["verdict"] != r["float32"]["verdict"] for r in records)
    result = {
        "command": " ".join(sys.argv), "model": str(args.model),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())},
        "scans": records,
        "summary": {
            "n_scans": len(records), "verdicts_changed": changed,
            "median_max_relative_change": float(np.median(
                [r["max_relative_change"] for r in records])),
            "median_seconds_float32": float(np.median([r["float32"]["seconds"]
                                                       for r in records])),
            "median_seconds_bf16": float(np.median([r["bf16"]["seconds"] for r in records])),
        },
    }
    print(json.dumps(result["summary"]), flush=True)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
