"""Lesion simulator (PROTOCOLS.md section 1).

Irregular lesions are grown in white matter with sizes drawn between 50 and 15,000 mm^3, a
total load drawn per subject, no overlap, multiplicative intensity changes (T1 about x0.79,
T2 about x1.37) applied through a Gaussian-smoothed (sigma 0.75 mm) version of the lesion so
that borders are soft. The ground-truth mask is the binary lesion. Variants: ``"ms"``
(default), ``"hyperintense_t1"`` and ``"mass"`` (one large space-occupying lesion anywhere
in the brain).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

LESION_KINDS = ("ms", "hyperintense_t1", "mass")


@dataclass
class LesionConfig:
    """Parameters of the simulator (volumes in mm^3, loads in mL, sigma in mm)."""

    kind: str = "ms"
    min_volume_mm3: float = 50.0
    max_volume_mm3: float = 15000.0
    min_load_ml: float = 2.0
    max_load_ml: float = 20.0
    max_lesions: int = 30
    t1_factor: tuple[float, float] = (0.79, 0.14)  # mean, SD
    t2_factor: tuple[float, float] = (1.37, 0.35)
    #: factors are clipped so that a lesion never changes sign of contrast
    t1_factor_range: tuple[float, float] = (0.3, 0.98)
    t2_factor_range: tuple[float, float] = (1.02, 3.0)
    contrast_boost: float = 1.0  # the reference study's results used 1.5
    border_sigma_mm: float = 0.75
    mass_volume_ml: tuple[float, float] = (20.0, 60.0)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind '{self.kind}' (choose from {LESION_KINDS})")
        if self.kind == "hyperintense_t1":
            self.t1_factor, self.t1_factor_range = (1.3, 0.1), (1.05, 2.0)

    def to_dict(self) -> dict:
        return asdict(self)


def _boosted(factor: float, boost: float) -> float:
    """Scale the deviation from 1 of an intensity factor by ``boost``."""
    return 1.0 + (factor - 1.0) * boost


def _grow_lesion(
    center: np.ndarray,
    volume_mm3: float,
    allowed: np.ndarray,
    spacing: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """Grow one irregular lesion of about ``volume_mm3`` around voxel ``center`` in ``allowed``.

    Returns the voxel indices ``(N, 3)`` of the lesion, or ``None`` when less than half the
    target volume fits.
    """
    radius_mm = (3 * volume_mm3 / (4 * np.pi)) ** (1 / 3)
    half = np.ceil(2.5 * radius_mm / spacing).astype(int) + 2
    low = np.maximum(center - half, 0)
    high = np.minimum(center + half + 1, allowed.shape)
    box_allowed = allowed[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    grid = (
        np.stack(
            np.meshgrid(
                *[np.arange(lo, hi) - c for lo, hi, c in zip(low, high, center, strict=True)],
                indexing="ij",
            ),
            axis=-1,
        )
        * spacing
    )
    # random anisotropic ellipsoid, randomly oriented, with a smooth irregular boundary
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = np.exp(rng.uniform(-0.4, 0.4, size=3))
    local = grid @ q / axes
    radial = np.linalg.norm(local, axis=-1) / radius_mm
    noise = ndimage.gaussian_filter(
        rng.normal(size=radial.shape), sigma=max(1.0, 0.5 * radius_mm / spacing.mean())
    )
    noise /= noise.std() + 1e-12
    field_ = radial * (1.0 + 0.25 * noise)
    n_voxels = int(round(volume_mm3 / np.prod(spacing)))
    candidates = np.flatnonzero(box_allowed)
    if candidates.size < n_voxels // 2 or n_voxels < 1:
        return None
    order = candidates[np.argsort(field_.ravel()[candidates], kind="stable")[:n_voxels]]
    blob = np.zeros(box_allowed.shape, bool)
    blob.ravel()[order] = True
    labels, _ = ndimage.label(blob, structure=np.ones((3, 3, 3), bool))
    center_label = labels[tuple(center - low)]
    if center_label == 0:
        return None
    blob = labels == center_label
    if blob.sum() < n_voxels / 2:
        return None
    return np.argwhere(blob) + low


def simulate_lesions(
    t1: np.ndarray,
    t2: np.ndarray,
    white_matter: np.ndarray,
    brain_mask: np.ndarray,
    spacing,
    rng: np.random.Generator,
    config: LesionConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Insert lesions into a T1/T2 pair.

    Args:
        t1, t2: ``(I, J, K)`` intensity volumes (not modified).
        white_matter: ``(I, J, K)`` white-matter probability in [0, 1].
        brain_mask: ``(I, J, K)`` bool.
        spacing: voxel size (mm), shape ``(3,)``.
        rng: the subject's random generator.
        config: simulator parameters.
    Returns:
        ``(t1_lesioned, t2_lesioned, lesion_mask, lesions)`` where ``lesion_mask`` is uint8
        and ``lesions`` lists per lesion: ``volume_mm3``, ``centroid_voxel``, ``t1_factor``,
        ``t2_factor``.
    """
    config = config or LesionConfig()
    spacing = np.asarray(spacing, dtype=float)
    voxel_mm3 = float(np.prod(spacing))
    if config.kind == "mass":
        allowed = ndimage.binary_erosion(brain_mask, iterations=2)
        center_region = white_matter > 0.5
        target_load = rng.uniform(*config.mass_volume_ml) * 1000.0
        max_lesions = 1
    else:
        allowed = (white_matter > 0.3) & brain_mask
        center_region = ndimage.binary_erosion(white_matter > 0.6, iterations=1)
        target_load = rng.uniform(config.min_load_ml, config.max_load_ml) * 1000.0
        max_lesions = config.max_lesions
    lesion_mask = np.zeros(t1.shape, bool)
    soft_t1 = np.zeros(t1.shape, np.float32)  # accumulated (factor - 1) * smoothed lesion
    soft_t2 = np.zeros(t1.shape, np.float32)
    lesions: list[dict] = []
    load = 0.0
    log_range = np.log([config.min_volume_mm3, config.max_volume_mm3])
    failures = 0
    while len(lesions) < max_lesions and failures < 50:
        remaining = target_load - load
        if remaining < config.min_volume_mm3:
            break
        if config.kind == "mass":
            volume = target_load
        else:
            volume = min(float(np.exp(rng.uniform(*log_range))), remaining)
        free = allowed & ~ndimage.binary_dilation(lesion_mask, iterations=2)
        centers = np.argwhere(center_region & free)
        if centers.size == 0:
            break
        center = centers[rng.integers(len(centers))]
        voxels = _grow_lesion(center, volume, free, spacing, rng)
        if voxels is None or len(voxels) * voxel_mm3 < config.min_volume_mm3:
            failures += 1
            continue
        single = np.zeros(t1.shape, bool)
        single[tuple(voxels.T)] = True
        lesion_mask |= single
        f1 = float(np.clip(rng.normal(*config.t1_factor), *config.t1_factor_range))
        f2 = float(np.clip(rng.normal(*config.t2_factor), *config.t2_factor_range))
        if config.kind == "mass":
            f1, f2 = (
                float(np.clip(rng.normal(0.7, 0.08), 0.4, 0.95)),
                float(np.clip(rng.normal(1.6, 0.2), 1.1, 3.0)),
            )
        f1, f2 = _boosted(f1, config.contrast_boost), _boosted(f2, config.contrast_boost)
        smooth = _smoothed_patch(single, voxels, config.border_sigma_mm / spacing)
        soft_t1 += (f1 - 1.0) * smooth
        soft_t2 += (f2 - 1.0) * smooth
        volume_done = len(voxels) * voxel_mm3
        load += volume_done
        lesions.append(
            {
                "volume_mm3": volume_done,
                "centroid_voxel": voxels.mean(axis=0).round(2).tolist(),
                "t1_factor": round(f1, 4),
                "t2_factor": round(f2, 4),
            }
        )
    t1_out = (t1 * np.clip(1.0 + soft_t1, 0.05, None)).astype(np.float32)
    t2_out = (t2 * np.clip(1.0 + soft_t2, 0.05, None)).astype(np.float32)
    return t1_out, t2_out, lesion_mask.astype(np.uint8), lesions


def _smoothed_patch(single: np.ndarray, voxels: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """Gaussian-smoothed copy of one lesion, computed only in a box around it."""
    margin = np.ceil(4 * sigma_vox).astype(int) + 1
    low = np.maximum(voxels.min(0) - margin, 0)
    high = np.minimum(voxels.max(0) + margin + 1, single.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    out = np.zeros(single.shape, np.float32)
    out[box] = ndimage.gaussian_filter(single[box].astype(np.float32), sigma_vox)
    return out
