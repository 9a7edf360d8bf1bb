"""Tissue label maps in model space, with the T1 they were made from.

Each subject has a tissue map (0 background, 1 CSF, 2 GM, 3 WM) on its native grid. The scan's
preprocessing mapping (cached by :func:`SpatialMSMALib.dataset.model_space`) carries it to the
model grid with nearest-neighbour resampling, so QC models see every map in the same
MNI-aligned space as the score models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError


def model_space_label_maps(scans, tissue_files: dict, cache_dir: str | Path,
                           spacing: float = 2.0, progress: bool = True,
                           images: bool = False) -> list[tuple]:
    """``[(id, labels (X, Y, Z) uint8)]`` (with ``images``: ``(id, labels, t1 (1, X, Y, Z))``)
    for ``scans`` (:class:`~SpatialMSMALib.dataset.ScanFiles`), ``tissue_files`` ``id -> path``."""
    from ..dataset import model_space
    from ..io import load_volume

    out = []
    for scan in model_space(scans, cache_dir, spacing, progress):
        if scan.id not in tissue_files:
            raise InputError(f"subject '{scan.id}' has no tissue label map")
        native = load_volume(tissue_files[scan.id], what="tissue labels").data
        labels = scan.mapping.to_model(np.asarray(native, np.float32), order=0)
        entry = (scan.id, np.rint(labels).astype(np.uint8))
        out.append((*entry, scan.image[:1]) if images else entry)
    return out


def cohort_label_maps(manifest_path: str | Path, splits: tuple[str, ...], cache_dir: str | Path,
                      spacing: float = 2.0, progress: bool = True,
                      images: bool = False) -> dict[str, list]:
    """``split -> [(id, labels (X, Y, Z) uint8)]`` on the model grid at ``spacing`` mm; with
    ``images``, ``split -> [(id, labels, t1 (1, X, Y, Z) float32)]`` (the preprocessed T1)."""
    from ..cohort import load_manifest
    from ..dataset import manifest_scans

    manifest = load_manifest(manifest_path)
    root = Path(manifest["root"])
    tissue_files = {s["id"]: root / s["tissue"] for s in manifest["subjects"] if s.get("tissue")}
    rows = manifest_scans(manifest_path, splits)
    missing = [scan.id for split in rows.values() for scan in split
               if scan.id not in tissue_files]
    if missing:
        raise InputError(f"{manifest_path}: subjects without a tissue map: {missing[:5]}")
    return {split: model_space_label_maps(scans, tissue_files, cache_dir, spacing, progress,
                                          images)
            for split, scans in rows.items()}


def folder_label_maps(folder: str | Path) -> tuple[list, dict]:
    """Scans (``<id>_t1.nii[.gz]``) of a folder and their ``<id>_tissue.nii[.gz]`` maps."""
    from ..dataset import folder_scans

    folder = Path(folder)
    scans = folder_scans(folder)
    tissue = {}
    for scan in scans:
        candidates = sorted(folder.glob(f"{scan.id}_tissue.nii*"))
        if not candidates:
            raise InputError(f"'{folder}': '{scan.t1.name}' has no '{scan.id}_tissue.nii[.gz]'")
        tissue[scan.id] = candidates[0]
    return scans, tissue
