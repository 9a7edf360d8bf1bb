"""Operating rate x growth factor of the post-processing, on a dev cohort's scans.

    python benchmarks/post_processing_sweep.py --model Resources/Models/spatial_msma.pt \\
        --manifest dev --cache CACHE --out results/post_processing_sweep/dev.json \\
        [--rates 0.01 0.005 0.003 0.002 0.001] [--factors none 2 3 5]

Each scan's heat map is computed once (the detection path: model grid, then native grid);
then, for every pair of voxel false-positive rate (the reported components' peak threshold,
from the healthy validation scans) and grow factor (``Calibration.grow_rate_factor``: the
components' extent reaches the threshold of that multiple of the rate; ``none``: no growth),
``detection.relabel`` labels it as a model with those settings would, and the pair's TPR for
lesions >= 0.5 mL, pooled PPV, Dice and healthy flagged volume are reported (PROTOCOLS.md
section 1). Everything else (smoothing, rim, minimum component size) is the model's. It
chooses post-processing on dev cohorts; run it on a test split only to report a choice
already made.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cohort_args import scans_with_local_norms  # noqa: E402
from spatial_3d import SPLITS, case_detection, operating_point_row  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from train_spatial import grow_factor  # noqa: E402  (the same parsing as training)

from SpatialMSMALib.dataset import manifest_scans  # noqa: E402
from SpatialMSMALib.detection import relabel  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.metrics import evaluate_operating_point  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402

RATES = (0.01, 0.005, 0.003, 0.002, 0.001)
FACTORS = ("none", "2", "3", "5")


def sweep_split(model: AnomalyModel, rows, cache: Path, rates, factors) -> dict:
    """``{"RATE|FACTOR": operating_point_row}`` over the scans ``rows``."""
    variants = {f: dataclasses.replace(model, calibration=dataclasses.replace(
        model.calibration, grow_rate_factor=f)) for f in factors}
    cases: dict = {}
    for row, scan, local in scans_with_local_norms(model, rows, cache):
        detection, _, truth, _ = case_detection(model, row, scan, local)
        for rate, factor in itertools.product(rates, factors):
            moved = relabel(detection, variants[factor], fpr=rate)
            cases.setdefault(f"{rate}|{factor}", []).append(evaluate_operating_point(
                moved.labels > 0, truth.data > 0, truth.spacing))
        print(f"{row.id} done", flush=True)
    return {key: operating_point_row(float(key.split("|")[0]), rows_)
            for key, rows_ in cases.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--splits", nargs="+", default=["test"], choices=list(SPLITS))
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--factors", type=grow_factor, nargs="+",
                        default=[grow_factor(f) for f in FACTORS])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not all(0 < r < 1 for r in args.rates):
        parser.error(f"voxel false-positive rates are fractions in (0, 1), got {args.rates}")
    try:
        if args.out.exists():
            raise InputError(f"'{args.out}' exists; remove it first")
        model = AnomalyModel.load(args.model)
        if model.spatial is None or model.calibration is None:
            raise InputError(f"{args.model}: has no Spatial-MSMA flow")
        results = {"model": str(args.model), "manifest": str(args.manifest),
                   "min_component_ml": model.calibration.min_component_ml, "splits": {}}
        for split in args.splits:
            by_name = manifest_scans(args.manifest, SPLITS[split])
            rows = [r for name in SPLITS[split] for r in by_name[name]]
            results["splits"][split] = sweep_split(model, rows, args.cache, args.rates,
                                                   args.factors)
            for key, row in results["splits"][split].items():
                print(f"{split} rate|factor {key}: TPR >= 0.5 mL "
                      f"{row['pooled_tpr_lesions_ge_0.5ml']:.3f}, PPV {row['pooled_ppv']:.3f}, "
                      f"healthy median {row['healthy_median_flagged_ml']:.2f} mL, "
                      f"Dice {row['dice_mean']:.3f}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
