"""Score norms on the CPU with torch's channels-last GroupNorm kernel against exact float32.

    python benchmarks/groupnorm_precision.py --manifest benchmark/manifest.json --cache CACHE \\
        [--model MODEL] [--scans 1] [--out results/groupnorm_precision.json]

1. GroupNorm(8, 16) on a random ``(1, 16, 92, 108, 96)`` tensor with mean OFFSET and SD 1,
   against a float64 reference: torch's kernel in the default and in the channels-last 3D
   memory format, and the score network's ``AccurateGroupNorm`` on channels-last input (the
   channels-last CPU kernel loses precision as the mean grows against the SD).
2. For the first healthy test scans: the whole-brain score norms as
   ``score.features.score_norm_features`` computes them on this CPU (channels-last input, two
   noise levels per pass, ``AccurateGroupNorm``), the same with torch's channels-last kernel
   (what the network ran until 2026-12-01), and the same with every GroupNorm given a
   contiguous tensor (the reference: it matched a run without oneDNN, the plain float32
   kernels, to 5e-7 on the first test scan, at 228 s instead of 28 s per scan). Per variant:
   the largest relative difference from the reference, seconds, and MSMA typicality verdict.
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
from SpatialMSMALib.score.network import AccurateGroupNorm  # noqa: E402

OFFSETS = (0.0, 10.0, 30.0, 100.0)


def group_norm_errors(offset: float, seed: int = 0) -> dict:
    """Relative L2 error against float64 of GroupNorm(8, 16) on a ``(1, 16, 92, 108, 96)``
    tensor of mean ``offset`` and SD 1: torch's kernel in both memory formats, and
    ``AccurateGroupNorm`` on the channels-last tensor."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 16, 92, 108, 96), generator=generator) + offset
    norm = AccurateGroupNorm(8, 16)
    channels_last = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        reference = F.group_norm(x.double(), 8, norm.weight.double(),
                                 norm.bias.double()).float()
        outputs = {"default": norm(x),
                   "torch_channels_last": F.group_norm(channels_last, 8, norm.weight,
                                                       norm.bias),
                   "accurate_channels_last": norm(channels_last)}

    def error(y):
        return float((y - reference).norm() / reference.norm())

    return {"offset": offset, **{name: error(y) for name, y in outputs.items()}}


@contextlib.contextmanager
def group_norm_kernel(variant: str):
    """Inside the block the score network's GroupNorms run ``variant``: ``torch`` (torch's
    kernel on the tensor as it comes, channels-last included) or ``contiguous`` (torch's
    kernel on a contiguous copy)."""
    original, fused = AccurateGroupNorm.forward, AccurateGroupNorm.fuse_film_silu

    def forward(self, x):
        x = x.contiguous() if variant == "contiguous" else x
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    AccurateGroupNorm.forward = forward
    AccurateGroupNorm.fuse_film_silu = False  # every normalisation through forward
    try:
        yield
    finally:
        AccurateGroupNorm.forward = original
        AccurateGroupNorm.fuse_film_silu = fused


VARIANTS = ("product", "torch_channels_last", "contiguous")


def scan_record(model, scan) -> dict:
    """Norms, seconds and verdict of each variant on one model-space scan."""
    norms, seconds = {}, {}
    for variant in VARIANTS:
        kernel = (contextlib.nullcontext() if variant == "product" else
                  group_norm_kernel("torch" if variant == "torch_channels_last"
                                    else "contiguous"))
        with kernel:
            norms[variant], seconds[variant] = whole_norms(model, scan, bf16=False)
    reference = norms["contiguous"]
    record = {"id": scan.id, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "max_relative_difference_from_contiguous": {
                  k: float(np.abs(v / reference - 1).max()) for k, v in norms.items()
                  if k != "contiguous"}}
    for variant, values in norms.items():
        verdict = model.typicality.assess(values[None])[0].to_dict()
        record[variant] = {k: verdict[k] for k in ("score", "percentile", "verdict")}
    return record


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
        record = scan_record(model, scan)
        result["scans"].append(record)
        print(json.dumps(record), flush=True)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
