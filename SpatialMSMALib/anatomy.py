"""Real anatomies the synthetic cohort is built from.

Each anatomy gives a T1 (whole head or skull-stripped), a brain mask and tissue probability
maps (CSF, GM, WM) on its own grid. nilearn's MNI ICBM152 2009a template ships with nilearn
and is always available; the files of ``shared/data/anatomy`` (Colin27, MNI152 NLin6Asym,
the ROBEX reference head) are used when a directory holding them is given. Anatomies without
their own tissue maps get them from a 3-class Gaussian mixture on brain T1 intensities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError
from .io import load_volume

#: Known anatomy files: name -> (T1 file, brain mask file, mask is "T1 > 0" of the file)
ANATOMY_FILES = {
    "colin27": ("colin27_t1.nii.gz", "colin27_t1_brain.nii.gz"),
    "mni152nlin6asym": ("mni152nlin6asym_t1_1mm.nii.gz", "mni152nlin6asym_brain_mask_1mm.nii.gz"),
    "robex_reference": ("robex_reference_head_t1.nii.gz", "robex_reference_head_brain_mask.nii.gz"),
}


@dataclass
class Anatomy:
    """One real anatomy on its own grid.

    Attributes:
        name: identifier written into manifests.
        t1: ``(I, J, K)`` float32, scaled so the median white-matter intensity is 1.
        brain_mask: ``(I, J, K)`` bool.
        tissue: ``(3, I, J, K)`` float32 probabilities of CSF, GM, WM (zero outside brain).
        affine: 4x4 voxel -> RAS mm.
        skull_stripped: True when the T1 holds only the brain.
    """

    name: str
    t1: np.ndarray
    brain_mask: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    skull_stripped: bool


def load_mni152_2009a() -> Anatomy:
    """nilearn's MNI ICBM152 2009a template (skull-stripped, 1 mm) with its GM/WM maps."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata()) > 0.5
    csf = np.clip(mask.astype(np.float32) - gm - wm, 0, 1)
    tissue = np.stack([csf, gm, wm]) * mask
    return Anatomy("mni152_2009a", _scale_to_wm(t1, wm > 0.9), mask, tissue, t1_img.affine, True)


def load_anatomy_file(name: str, anatomy_dir: Path, seed: int = 0) -> Anatomy:
    """One of :data:`ANATOMY_FILES` from ``anatomy_dir``; tissue maps from a 3-class GMM."""
    t1_file, mask_file = ANATOMY_FILES[name]
    t1_volume = load_volume(anatomy_dir / t1_file, what=f"{name} T1")
    mask_volume = load_volume(anatomy_dir / mask_file, what=f"{name} brain mask")
    if mask_volume.shape != t1_volume.shape:
        raise InputError(f"'{anatomy_dir / mask_file}': grid differs from its T1")
    t1 = np.asarray(t1_volume.data, dtype=np.float32)
    mask = ndimage.binary_fill_holes(np.asarray(mask_volume.data) > 0)
    tissue = tissue_maps_from_t1(t1, mask, seed=seed)
    t1 = _scale_to_wm(t1, tissue[2] > 0.9)
    return Anatomy(name, t1, mask, tissue, t1_volume.affine, False)


def available_anatomies(anatomy_dir: str | Path | None) -> list[str]:
    """Names of anatomies that can be loaded: the nilearn template plus complete files."""
    names = ["mni152_2009a"]
    if anatomy_dir is not None:
        anatomy_dir = Path(anatomy_dir)
        if not anatomy_dir.is_dir():
            raise InputError(f"anatomy directory '{anatomy_dir}' does not exist")
        for name, files in ANATOMY_FILES.items():
            if all((anatomy_dir / f).is_file() for f in files):
                names.append(name)
    return names


def load_anatomy(name: str, anatomy_dir: str | Path | None) -> Anatomy:
    if name == "mni152_2009a":
        return load_mni152_2009a()
    if anatomy_dir is None:
        raise InputError(f"anatomy '{name}' needs --anatomy-dir")
    return load_anatomy_file(name, Path(anatomy_dir))


def tissue_maps_from_t1(t1: np.ndarray, brain_mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """CSF/GM/WM posterior probabilities, shape ``(3, I, J, K)``, from a 1D 3-class GMM.

    Classes are ordered by mean T1 intensity (CSF darkest, WM brightest). Deterministic for a
    fixed ``seed``.
    """
    from sklearn.mixture import GaussianMixture

    values = t1[brain_mask].astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    values = np.clip(values, low, high)
    rng = np.random.default_rng(seed)
    sample = values[rng.choice(values.size, size=min(200_000, values.size), replace=False)]
    gmm = GaussianMixture(
        3, random_state=seed, means_init=np.percentile(sample, [10, 50, 85])[:, None]
    )
    gmm.fit(sample[:, None])
    order = np.argsort(gmm.means_[:, 0])
    posterior = gmm.predict_proba(values[:, None])[:, order]
    tissue = np.zeros((3, *t1.shape), dtype=np.float32)
    for c in range(3):
        tissue[c][brain_mask] = posterior[:, c]
    return tissue


def _scale_to_wm(t1: np.ndarray, wm_mask: np.ndarray) -> np.ndarray:
    reference = float(np.median(t1[wm_mask])) if wm_mask.any() else float(np.percentile(t1, 99))
    return (np.clip(t1, 0, None) / reference).astype(np.float32)
