"""How far the CPU's score norms are from exact float32: GroupNorm on channels-last tensors.

    python benchmarks/groupnorm_precision.py --manifest benchmark/manifest.json --cache CACHE \\
        [--model MODEL] [--scans 1] [--out results/groupnorm_precision.json]

1. ``torch.nn.GroupNorm`` on a random ``(1, 16, 92, 108, 96)`` tensor with mean OFFSET and
   SD 1, in the default and in the channels-last 3D memory format, against a float64
   reference: the relative error of each (the channels-last CPU kernel loses precision as
   the mean grows against the SD).
2. For the first healthy test scans: the whole-brain score norms as
   ``score.features.score_norm_features`` computes them on this CPU (channels-last input,
   two noise levels per pass), against the same with every GroupNorm given a contiguous
   tensor (which matches a run without oneDNN, the plain float32 kernels, to 5e-7 on the
   first test scan, at 228 s instead of 28 s per scan), and the MSMA typicality verdict
   of each.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohort_args import cohort_parser, exit_with, refuse_existing_output  # noqa: E402
from feature_precision import whole_norms  # noqa: E402

from SpatialMSMALib.dataset import manifest_scans, model_space  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import write_text_atomically  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402

OFFSETS = (0.0, 10.0, 30.0, 100.0)


def group_norm_errors(offset: float, seed: int = 0) -> dict:
    """Relative L2 error against float64 of GroupNorm(8, 16) on a ``(1, 16, 92, 108, 96)``
    tensor of mean ``offset`` and SD 1, in both memory formats."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 16, 92, 108, 96), generator=generator) + offset
    norm = torch.nn.GroupNorm(8, 16)
    with torch.no_grad():
        reference = F.group_norm(x.double(), 8, norm.weight.double(),
                                 norm.bias.double()).float()
        default = norm(x)
        channels_last = norm(x.contiguous(memory_format=torch.channels_last_3d))

    def error(y):
        return float((y - reference).norm() / reference.norm())

    return {"offset": offset, "default": error(default), "channels_last": error(channels_last)}


@contextlib.contextmanager
def contiguous_group_norm():
    """Inside the block every ``nn.GroupNorm`` normalises a contiguous copy of its input."""
    original = torch.nn.GroupNorm.forward

    def forward(self, x):
        return F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)

    torch.nn.GroupNorm.forward = forward
    try:
        yield
    finally:
        torch.nn.GroupNorm.forward = original


def main() -> None:
    parser = cohort_parser(__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=1)
    args = parser.parse_args()
    try:
        refuse_existing_output(args)
        model = AnomalyModel.load(args.model)
        if model.typicality is None:
            raise InputError(f"'{args.model}' carries no MSMA typicality model")
        rows = manifest_scans(args.manifest, ("test_healthy",))["test_healthy"][: args.scans]
    except InputError as e:
        exit_with(e)
    result = {"command": " ".join(sys.argv), "model": str(args.model),
              "machine": {"cpu_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "torch": torch.__version__},
              "group_norm": [group_norm_errors(o) for o in OFFSETS], "scans": []}
    print(json.dumps(result["group_norm"]), flush=True)
    scans = model_space(rows, args.cache, model.spacing_mm, demons=model.demons,
                        version=model.preprocess_version, channels=len(model.channel_names))
    for scan in scans:
        product, product_s = whole_norms(model, scan, bf16=False)
        with contiguous_group_norm():
            accurate, accurate_s = whole_norms(model, scan, bf16=False)
        verdicts = [model.typicality.assess(v[None])[0].to_dict() for v in (product, accurate)]
        record = {"id": scan.id, "max_relative_change": float(np.abs(product / accurate - 1).max()),
                  "seconds": {"product": round(product_s, 1), "contiguous": round(accurate_s, 1)},
                  **{name: {k: v[k] for k in ("score", "percentile", "verdict")}
                     for name, v in zip(("product", "contiguous"), verdicts, strict=True)}}
        result["scans"].append(record)
        print(json.dumps(record), flush=True)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
