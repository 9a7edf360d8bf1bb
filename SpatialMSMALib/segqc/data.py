"""Tissue label maps of the benchmark cohort in model space.

Each cohort subject has ``<id>_tissue.nii.gz`` (0 background, 1 CSF, 2 GM, 3 WM) on its native
grid. The scan's preprocessing mapping (cached by :func:`SpatialMSMALib.dataset.model_space`)
carries it to the model grid with nearest-neighbour resampling, so QC models see every map in
the same MNI-aligned space as the score models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError


def cohort_label_maps(manifest_path: str | Path, splits: tuple[str, ...], cache_dir: str | Path,
                      spacing: float = 2.0, progress: bool = True) -> dict[str, list]:
    """``split -> [(id, labels (X, Y, Z) uint8)]`` on the model grid at ``spacing`` mm."""
    from ..cohort import load_manifest
    from ..dataset import manifest_scans, model_space
    from ..io import load_volume

    manifest = load_manifest(manifest_path)
    root = Path(manifest["root"])
    tissue_files = {s["id"]: root / s["tissue"] for s in manifest["subjects"] if s.get("tissue")}
    rows = manifest_scans(manifest_path, splits)
    out = {}
    for split, scans in rows.items():
        out[split] = []
        for scan in model_space(scans, cache_dir, spacing, progress, need_mapping=True):
            if scan.id not in tissue_files:
                raise InputError(f"{manifest_path}: subject '{scan.id}' has no tissue map")
            native = load_volume(tissue_files[scan.id], what="tissue labels").data
            labels = scan.mapping.to_model(np.asarray(native, np.float32), order=0)
            out[split].append((scan.id, np.rint(labels).astype(np.uint8)))
    return out
