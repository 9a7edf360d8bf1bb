"""Does averaging flows help? The mean NLL of several flows trained by ``flow_inputs.py``.

    python benchmarks/flow_ensemble.py --manifest benchmark --cache CACHE \\
        --train-manifest train_cohort --train-cache TRAIN_CACHE \\
        --dev-manifest dev --dev-cache DEV_CACHE \\
        --member runs/flow_inputs/a 0,4,8 --member runs/flow_inputs/b 0,4,8 \\
        [--standardise] --name NAME --out RESULT.json

Each ``--member`` is a ``flow_inputs.py`` work folder (its ``best.pt``) and the Gaussian
scales (mm) its inputs were built with. Per scan, every member's raw NLL map is computed on
the model grid; with ``--standardise`` each is first mapped by its own healthy-validation
statistics, (NLL - median) / (99th percentile - median), so that flows of different inputs
(whose NLLs have different offsets) weigh alike. The mean over members is smoothed like the
detector's heat map and calibrated on the healthy ``val`` scans of the training cohort
(label-free, PROTOCOLS.md), then evaluated exactly as ``flow_inputs.py`` evaluates one
variant (dev, test, LOAO; model grid). Cost: one flow evaluation per member and scan (about
1 s each on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from flow_inputs import (
    RIM_MM,
    SMOOTHING_MM,
    SPACING_MM,
    evaluate_and_write,
    load_scan,
    parse_scales,
)

from SpatialMSMALib.dataset import manifest_scans
from SpatialMSMALib.spatial import Calibration, smooth_in_region
from SpatialMSMALib.spatial_training import load_best_flow


def member_raw_nlls(members, cache: Path, scan_id: str):
    """Every member's unsmoothed NLL ``(X, Y, Z)`` (NaN outside the scored region) for one
    scan, the scored region and the scan's mapping; members with the same scales share one
    multi-scale image."""
    images, maps = {}, []
    for folder, flow, scales in members:
        if tuple(scales) not in images:
            images[tuple(scales)] = load_scan(cache, scan_id, scales)
        image, _, region, mapping, _ = images[tuple(scales)]
        if image.shape[0] != flow.config.in_channels:
            raise SystemExit(f"error: member '{folder}' models {flow.config.in_channels} "
                             f"channels, but its scales {scales} give {image.shape[0]} for "
                             f"'{scan_id}': give the scales it was trained with")
        maps.append(flow.heat_map(np.zeros((0, *region.shape), np.float32), image, region))
    return maps, region, mapping


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--train-manifest", type=Path, required=True,
                   help="cohort whose healthy val scans calibrate the ensemble")
    p.add_argument("--train-cache", type=Path, required=True)
    p.add_argument("--dev-manifest", type=Path, required=True)
    p.add_argument("--dev-cache", type=Path, required=True)
    p.add_argument("--member", nargs=2, action="append", metavar=("WORK_DIR", "SCALES_MM"),
                   required=True, help="a flow_inputs.py work folder and its scales, e.g. 0,4,8")
    p.add_argument("--standardise", action="store_true")
    p.add_argument("--name", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args()
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: '{args.out}' exists; pass --overwrite to replace it")
    members = []
    for folder, scales in args.member:
        checkpoint = Path(folder) / "best.pt"
        if not checkpoint.exists():
            raise SystemExit(f"error: '{checkpoint}' is missing: not a flow_inputs.py work folder")
        members.append((folder, load_best_flow(checkpoint),
                        parse_scales(scales, f"--member {folder}")))

    # the healthy validation maps, computed once: standardisation and calibration
    val_rows = manifest_scans(args.train_manifest, ("val",))["val"]
    val_maps = [member_raw_nlls(members, args.train_cache, row.id) for row in val_rows]
    offsets = []
    for i in range(len(members)):
        values = np.concatenate([maps[i][region] for maps, region, _ in val_maps])
        median, p99 = np.percentile(values, [50, 99])
        offsets.append((median, p99 - median) if args.standardise else (0.0, 1.0))

    def combined(maps, region):
        mean = np.mean([(raw - shift) / scale
                        for raw, (shift, scale) in zip(maps, offsets, strict=True)], axis=0)
        return smooth_in_region(mean, region, SMOOTHING_MM / SPACING_MM)

    def heat_of(cache, scan_id):
        maps, region, mapping = member_raw_nlls(members, cache, scan_id)
        return combined(maps, region), region, mapping

    calibration = Calibration.from_healthy(
        [combined(maps, region)[region] for maps, region, _ in val_maps])
    result = {"name": args.name, "members": [{"work": f, "scales_mm": s} for f, s in args.member],
              "standardise": args.standardise, "combination": "mean of member NLL maps",
              "train_cohort": str(args.train_manifest), "grid": "model grid, 2 mm",
              "rim_mm": RIM_MM, "smoothing_mm": SMOOTHING_MM, "splits": {}}
    evaluate_and_write(result, heat_of, calibration, args)


if __name__ == "__main__":
    main()
