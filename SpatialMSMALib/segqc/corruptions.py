"""Label-map corruptions with a known severity (PROTOCOLS.md sec. 5) and the Dice they cause.

Label convention: 0 background, 1 CSF, 2 GM, 3 WM. Every corruption is a pure function
``(labels, severity, rng) -> corrupted`` on an integer array (2D or 3D, voxel indices), with
``severity`` in ``(0, 1]`` mapped to a size in voxels; the input is never modified. The true
damage is measured afterwards with :func:`mean_dice` against the clean map, so severity only
has to be monotone, not calibrated.

- ``erode`` / ``dilate``: one tissue class loses / gains a shell of 1-3 voxels (eroded voxels
  take the label of the nearest other tissue).
- ``swap``: two tissue labels exchanged inside a ball (radius up to a third of the brain).
- ``missing``: a ball of brain set to background (a missing structure).
- ``extra``: a spurious blob of one tissue label, inside or just outside the brain.
- ``shift``: the whole map moved by 1-4 voxels along one axis.
- ``noise``: a fraction (up to 30%) of brain voxels relabelled at random.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TISSUE_LABELS = (1, 2, 3)
LABEL_NAMES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}


def mean_dice(truth: np.ndarray, prediction: np.ndarray, labels=TISSUE_LABELS) -> float:
    """Mean over ``labels`` of the per-label Dice (a label absent from both counts 1)."""
    scores = []
    for label in labels:
        t, p = truth == label, prediction == label
        total = t.sum() + p.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(t, p).sum() / total)
    return float(np.mean(scores))


def _nearest_other(labels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """For each voxel, the label of the nearest voxel outside ``region`` (same shape)."""
    _, index = ndimage.distance_transform_edt(region, return_indices=True)
    return labels[tuple(index)]


def _random_brain_voxel(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    brain = np.argwhere(labels > 0)
    if len(brain) == 0:
        raise ValueError("the label map has no brain (non-zero) voxels")
    return brain[rng.integers(len(brain))]


def _ball(shape, centre, radius: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2


def _brain_radius(labels: np.ndarray) -> float:
    """Radius (voxels) of a ball with the brain's volume."""
    volume = float((labels > 0).sum())
    if labels.ndim == 2:
        return float(np.sqrt(volume / np.pi))
    return float((3 * volume / (4 * np.pi)) ** (1 / 3))


def erode(labels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    label = int(rng.choice(TISSUE_LABELS))
    iterations = 1 + int(round(2 * severity))
    mask = labels == label
    lost = mask & ~ndimage.binary_erosion(mask, iterations=iterations)
    out = labels.copy()
    out[lost] = _nearest_other(labels, mask)[lost]
    return out


def dilate(labels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    label = int(rng.choice(TISSUE_LABELS))
    iterations = 1 + int(round(2 * severity))
    mask = labels == label
    grown = ndimage.binary_dilation(mask, iterations=iterations) & (labels > 0) & ~mask
    out = labels.copy()
    out[grown] = label
    return out


def swap(labels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    a, b = rng.choice(TISSUE_LABELS, size=2, replace=False)
    region = _ball(labels.shape, _random_brain_voxel(labels, rng),
                   max(2.0, severity * _brain_radius(labels) / 1.5))
    out = labels.copy()
    out[region & (labels == a)] = b
    out[region & (labels == b)] = a
    return out


def missing(labels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    region = _ball(labels.shape, _random_brain_voxel(labels, rng),
                   max(2.0, severity * _brain_radius(labels) / 2))
    out = labels.copy()
    out[region] = 0
    return out


def extra(labels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    label = int(rng.choice(TISSUE_LABELS))
    centre = _random_brain_voxel(labels, rng)
    # push the centre outwards a little: blobs straddle the brain edge as often as not
    brain_centre = np.argwhere(labels > 0).mean(0)
    direction = centre - brain_centre
    centre = centre + 0.3 * direction * rng.random()
    region = _ball(labels.shape, centre, max(2.0, severity * _brain_radius(labels) / 3))
    out = labels.copy()
    out[region] = label
    return out


def shift(labels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    voxels = 1 + int(round(3 * severity))
    axis = int(rng.integers(labels.ndim))
    voxels *= int(rng.choice([-1, 1]))
    out = np.zeros_like(labels)
    source = [slice(None)] * labels.ndim
    target = [slice(None)] * labels.ndim
    if voxels > 0:
        source[axis], target[axis] = slice(0, -voxels), slice(voxels, None)
    else:
        source[axis], target[axis] = slice(-voxels, None), slice(0, voxels)
    out[tuple(target)] = labels[tuple(source)]
    return out


def noise(labels: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    brain = np.flatnonzero(labels > 0)
    chosen = rng.choice(brain, size=int(round(0.3 * severity * len(brain))), replace=False)
    out = labels.copy()
    out.reshape(-1)[chosen] = rng.choice(TISSUE_LABELS, size=len(chosen))
    return out


CORRUPTIONS = {
    "erode": erode,
    "dilate": dilate,
    "swap": swap,
    "missing": missing,
    "extra": extra,
    "shift": shift,
    "noise": noise,
}


def corrupt(labels: np.ndarray, kind: str, severity: float,
            rng: np.random.Generator) -> np.ndarray:
    """Apply corruption ``kind`` (see :data:`CORRUPTIONS`) at ``severity`` in (0, 1]."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{kind}' (have: {sorted(CORRUPTIONS)})")
    if not 0 < severity <= 1:
        raise ValueError(f"severity must be in (0, 1], got {severity}")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label maps must be integer arrays, got {labels.dtype}")
    return CORRUPTIONS[kind](labels, severity, rng)
