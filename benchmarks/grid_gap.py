"""Which lesions the native-grid evaluation loses that the model grid finds, on one heat map.

    python benchmarks/grid_gap.py --model Resources/Models/spatial_msma.pt --manifest benchmark \\
        --cache CACHE [--split test_lesioned] [--out results/grid_gap.json]

For each lesioned scan of the split: the product's heat map (``detection.model_heat_map``,
template space for a deformable model), labelled twice at the model's default threshold and
minimum component size: (a) on the native grid, exactly as ``detect`` and
``benchmarks/spatial_3d.py`` do, and (b) on the affine 2 mm model grid after the inverse
field (the grid of ``benchmarks/flow_inputs.py``). Every manifest lesion >= 0.5 mL (the
native truth component holding its centroid) counts as found on a grid when a flagged voxel
touches it there. Reported: both TPRs, the lesions found on one grid only, and each lesion's
peak heat on both grids. The cache is ``spatial_3d.py``'s (features are not needed: the
bundled flows read intensities; a score-norm flow is refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_inputs import is_faint, large_lesions_native  # noqa: E402

from SpatialMSMALib.cohort import load_manifest  # noqa: E402
from SpatialMSMALib.dataset import manifest_scans, model_space  # noqa: E402
from SpatialMSMALib.detection import model_heat_map, native_detection  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import load_volume  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402
from SpatialMSMALib.spatial import label_anomalies, scored_region  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--split", default="test_lesioned")
    p.add_argument("--out", type=Path)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    if args.out and args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: '{args.out}' exists; pass --overwrite to replace it")
    model = AnomalyModel.load(args.model)
    if model.spatial.config.score_features:
        raise SystemExit("error: this model's flow reads score norms; grid_gap.py runs "
                         "intensity flows only")
    subjects = {s["id"]: s for s in load_manifest(args.manifest)["subjects"]}
    rows = manifest_scans(args.manifest, (args.split,))[args.split]
    scans = model_space(rows, args.cache, model.spacing_mm, demons=model.demons,
                        version=model.preprocess_version,
                        channels=len(model.channel_names), progress=False)
    calibration = model.calibration
    threshold, floor = calibration.default_threshold, float(calibration.scores[-1])
    spacing = (model.spacing_mm,) * 3
    lesions = []
    for row, scan in zip(rows, scans, strict=True):
        no_norms = np.zeros((0, *scan.brain_mask.shape), np.float32)
        heat = model_heat_map(model, scan.image, scan.brain_mask, no_norms)
        native = native_detection(model, heat, scan.mapping,
                                  load_volume(row.brain_mask, what="brain mask").data > 0)
        with np.load(args.cache / f"{row.id}_{model.spacing_mm:g}mm.npz") as cached:
            affine_brain = cached["brain_mask"] > 0
        region = scored_region(affine_brain, calibration.rim_mm, model.spacing_mm)
        affine_heat = np.where(region, scan.mapping.undeform(
            np.nan_to_num(heat, nan=floor), order=1, fill=floor), np.nan)
        model_labels = label_anomalies(affine_heat, region, threshold, spacing,
                                       calibration.min_component_ml,
                                       calibration.peak_threshold(threshold))[0] > 0
        truth = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True).data > 0
        for lesion, on_native in large_lesions_native(subjects[row.id], truth):
            on_model = scan.mapping.to_model(on_native.astype(np.float32)) > 0.5
            lesions.append({
                "scan": row.id, "volume_mm3": lesion["volume_mm3"], "faint": is_faint(lesion),
                "found_model_grid": bool(model_labels[on_model].any()),
                "found_native": bool((native.labels[on_native] > 0).any()),
                "peak_model_grid": float(np.nanmax(np.where(on_model, affine_heat, -np.inf))),
                "peak_native": float(np.nanmax(native.heat[on_native]))})
    model_hits = np.array([x["found_model_grid"] for x in lesions])
    native_hits = np.array([x["found_native"] for x in lesions])
    result = {"model": str(args.model or "bundled"), "split": args.split,
              "threshold": threshold, "n_lesions_ge_0.5ml": len(lesions),
              "tpr_model_grid": float(model_hits.mean()), "tpr_native": float(native_hits.mean()),
              "model_grid_only": [x for x in lesions if x["found_model_grid"]
                                  and not x["found_native"]],
              "native_only": [x for x in lesions if x["found_native"]
                              and not x["found_model_grid"]],
              "lesions": lesions}
    print(f"{len(lesions)} lesions >= 0.5 mL: TPR model grid {model_hits.mean():.3f}, native "
          f"{native_hits.mean():.3f}; found on the model grid only: "
          f"{len(result['model_grid_only'])}, native only: {len(result['native_only'])}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # a bad manifest, cache or model file: one line naming it
        raise SystemExit(f"error: {e}") from None
