"""Does the deformable step (preprocessing step 7) register lesions away?

    python benchmarks/lesion_squeeze.py --manifest benchmark --cache CACHE \\
        [--demons-iterations 100 --demons-smoothing-vox 1.5] [--splits test loao] --out R.json \\
        [--overwrite]

For every lesion of at least 0.5 mL in the lesioned scans of the splits: its volume on the
model grid in template space (the scan's labelled truth mapped through the demons field)
over its volume on the affinely registered model grid (the same mapping without the field).
1 = untouched, < 1 squeezed, > 1 stretched. Uses (and fills) the cohort's model-space cache,
so it shares the demons entries with ``spatial_3d.py`` and ``train_spatial.py``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from SpatialMSMALib.dataset import manifest_scans, model_space
from SpatialMSMALib.io import load_volume
from SpatialMSMALib.metrics import LARGE_LESION_MM3
from SpatialMSMALib.preprocessing import DemonsConfig

SPACING_MM = 2.0


def volume_ratios(labels_native: np.ndarray, mapping) -> list[tuple[float, float]]:
    """``(affine volume mL, template / affine volume)`` of each labelled lesion >= 0.5 mL;
    ``labels_native`` holds lesion ids 1..n on the native grid."""
    affine_only = replace(mapping, template_displacement=None, template_inverse=None)
    on_affine = affine_only.to_model(labels_native.astype(np.float32), order=0)
    on_template = mapping.to_model(labels_native.astype(np.float32), order=0)
    voxel_mm3 = SPACING_MM**3
    out = []
    for k in range(1, int(labels_native.max()) + 1):
        before = int((on_affine == k).sum())
        if before * voxel_mm3 >= LARGE_LESION_MM3:
            out.append((before * voxel_mm3 / 1000, int((on_template == k).sum()) / before))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--demons-iterations", type=int, default=100)
    p.add_argument("--demons-smoothing-vox", type=float, default=1.5)
    p.add_argument("--splits", nargs="+", default=["test", "loao"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args()
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: '{args.out}' exists; pass --overwrite to replace it")
    try:
        demons = DemonsConfig(args.demons_iterations, args.demons_smoothing_vox)
    except ValueError as e:
        raise SystemExit(f"error: --demons-iterations / --demons-smoothing-vox: {e}") from None
    result = {"demons": asdict(demons), "cohort": args.manifest.name,
              "rule": "per lesion >= 0.5 mL: model-grid volume in template space / on the "
                      "affine model grid", "splits": {}}
    for split in args.splits:
        key = f"{split}_lesioned"
        rows = manifest_scans(args.manifest, (key,))[key]
        scans = model_space(rows, args.cache, SPACING_MM, demons=demons)
        lesions = []
        for row, scan in zip(rows, scans, strict=True):
            truth = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True).data > 0
            labels, _ = ndimage.label(truth)
            lesions += [{"id": row.id, "volume_ml": round(v, 3), "ratio": round(r, 4)}
                        for v, r in volume_ratios(labels, scan.mapping)]
        if not lesions:
            raise SystemExit(f"error: the {key} scans of '{args.manifest}' have no lesion "
                             ">= 0.5 mL")
        ratios = np.array([x["ratio"] for x in lesions])
        result["splits"][split] = {
            "n_lesions_ge_0.5ml": len(lesions), "median": float(np.median(ratios)),
            "p5": float(np.percentile(ratios, 5)), "min": float(ratios.min()),
            "max": float(ratios.max()), "lesions": lesions}
        print(split, {k: v for k, v in result["splits"][split].items() if k != "lesions"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
