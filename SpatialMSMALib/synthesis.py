"""Synthetic healthy subjects from a real anatomy (pure numerics, seeded).

A subject is the anatomy seen through: a small random affine (rotation, scaling,
translation), a random smooth diffeomorphic deformation (a stationary velocity field
integrated by scaling and squaring), a gamma contrast change, a T2-like channel synthesized
from the tissue maps (labelled synthetic everywhere), optional lesions, a smooth
multiplicative bias field per channel, and Rician noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy
from .geometry import Grid, affine_about_point, apply_affine_to_coordinates, rotation_matrix
from .lesions import LesionConfig, simulate_lesions
from .morph import MorphField, morph_coordinates


@dataclass
class SubjectConfig:
    """Variability of synthetic subjects (angles in degrees, lengths in mm)."""

    spacing_mm: float = 2.0
    rotation_deg: float = 6.0
    scale_sd: float = 0.04
    translation_mm: float = 6.0
    deformation_mm: float = 2.5  # SD of the velocity field at control points
    control_spacing_mm: float = 24.0
    gamma_sd: float = 0.12
    bias_amplitude: float = 0.12  # SD of the log bias field
    noise_range: tuple[float, float] = (0.01, 0.04)  # Rician sigma, relative to WM intensity
    t2_tissue_levels: tuple[float, float, float] = (1.0, 0.55, 0.35)  # CSF, GM, WM

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Subject:
    """One synthetic scan on its own grid (all arrays ``(I, J, K)``)."""

    t1: np.ndarray
    t2: np.ndarray
    brain_mask: np.ndarray  # uint8
    lesion_mask: np.ndarray  # uint8
    tissue_labels: np.ndarray  # uint8: 0 background, 1 CSF, 2 GM, 3 WM
    grid: Grid
    lesions: list
    subject_to_anatomy: np.ndarray  # 4x4 affine part of the subject -> anatomy RAS map


def subject_grid(anatomy: Anatomy, spacing_mm: float) -> Grid:
    """Axis-aligned RAS grid covering the anatomy's field of view at ``spacing_mm``."""
    shape = np.array(anatomy.t1.shape)
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in shape], indexing="ij")).reshape(3, -1).T
    world = corners @ anatomy.affine[:3, :3].T + anatomy.affine[:3, 3]
    low, high = world.min(0), world.max(0)
    out_shape = np.ceil((high - low) / spacing_mm).astype(int) + 1
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = low
    return Grid(tuple(int(s) for s in out_shape), affine)


def smooth_random_field(
    shape: tuple[int, ...], control_shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Unit-SD-at-control-points random field, cubic-interpolated from a coarse grid."""
    coarse = rng.normal(size=control_shape)
    zoom = [s / c for s, c in zip(shape, control_shape, strict=True)]
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    return field[tuple(slice(0, s) for s in shape)]


def diffeomorphic_displacement(
    shape: tuple[int, int, int],
    spacing_mm: float,
    sd_mm: float,
    control_spacing_mm: float,
    rng: np.random.Generator,
    steps: int = 6,
) -> np.ndarray:
    """Smooth invertible displacement field (mm), shape ``(3, I, J, K)``.

    A random stationary velocity field (SD ``sd_mm`` at control points every
    ``control_spacing_mm``) is exponentiated by scaling and squaring on a half-resolution
    grid, then upsampled.
    """
    coarse_shape = tuple(max(4, s // 2) for s in shape)
    control = tuple(max(3, int(round(s * spacing_mm / control_spacing_mm))) for s in shape)
    velocity = np.stack([smooth_random_field(coarse_shape, control, rng) for _ in range(3)])
    coarse_spacing = np.array(shape) * spacing_mm / np.array(coarse_shape)
    displacement = velocity * sd_mm / 2**steps / coarse_spacing[:, None, None, None]  # voxels
    identity = np.indices(coarse_shape, dtype=np.float32)
    for _ in range(steps):
        warped = identity + displacement
        displacement = displacement + np.stack(
            [ndimage.map_coordinates(d, warped, order=1, mode="nearest") for d in displacement]
        )
    displacement_mm = displacement * coarse_spacing[:, None, None, None]
    zoom = [s / c for s, c in zip(shape, coarse_shape, strict=True)]
    return np.stack(
        [
            ndimage.zoom(d, zoom, order=1, mode="nearest", grid_mode=True)[
                : shape[0], : shape[1], : shape[2]
            ]
            for d in displacement_mm
        ]
    ).astype(np.float32)


def random_affine(
    center: np.ndarray, config: SubjectConfig, rng: np.random.Generator
) -> np.ndarray:
    """4x4 RAS map subject -> anatomy: rotation, anisotropic scaling, translation."""
    angles = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg, size=3))
    scales = np.exp(rng.normal(0, config.scale_sd, size=3))
    translation = rng.uniform(-config.translation_mm, config.translation_mm, size=3)
    return affine_about_point(rotation_matrix(angles) @ np.diag(scales), translation, center)


def rician(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rician noise: magnitude of the image plus complex Gaussian noise of SD ``sigma``."""
    real = image + rng.normal(0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def synthesize_subject(
    anatomy: Anatomy,
    seed: int,
    config: SubjectConfig | None = None,
    lesion_config: LesionConfig | None = None,
    morph: tuple[MorphField, float] | None = None,
) -> Subject:
    """Build one subject from ``anatomy``; deterministic given ``seed``.

    ``lesion_config=None`` makes a healthy subject. ``morph`` ``(field, weight)`` first
    reshapes the anatomy part of the way (``weight`` in [0, 1]) towards the field's target
    anatomy (:mod:`.morph`; ``field.source`` must be ``anatomy``); the random draws are the
    same with or without it.
    """
    if morph is not None and morph[0].source != anatomy.name:
        raise ValueError(f"morph field of '{morph[0].source}' given for '{anatomy.name}'")
    config = config or SubjectConfig()
    rng = np.random.default_rng(seed)
    grid = subject_grid(anatomy, config.spacing_mm)
    brain_center = (
        anatomy.affine[:3, :3] @ np.argwhere(anatomy.brain_mask).mean(0) + anatomy.affine[:3, 3]
    )
    subject_to_anatomy = random_affine(brain_center, config, rng)
    displacement = diffeomorphic_displacement(
        grid.shape, config.spacing_mm, config.deformation_mm, config.control_spacing_mm, rng
    )
    # subject voxel -> subject RAS (+ deformation) -> anatomy RAS -> anatomy voxel
    world = np.indices(grid.shape, dtype=np.float32)
    world = apply_affine_to_coordinates(grid.affine, world)
    world += displacement
    to_voxel = np.linalg.inv(anatomy.affine) @ subject_to_anatomy
    coords = apply_affine_to_coordinates(to_voxel, world)
    del world, displacement
    if morph is not None:
        coords = morph_coordinates(coords, anatomy.affine, *morph)

    def warp(array: np.ndarray, order: int = 1) -> np.ndarray:
        return ndimage.map_coordinates(array, coords, order=order, mode="constant", cval=0.0)

    t1 = warp(anatomy.t1).astype(np.float32)
    tissue = np.stack([warp(p) for p in anatomy.tissue]).astype(np.float32)
    brain = warp(anatomy.brain_mask.astype(np.float32)) > 0.5

    gamma = float(np.exp(rng.normal(0, config.gamma_sd)))
    t1 = np.clip(t1, 0, None) ** gamma
    levels = np.asarray(config.t2_tissue_levels) * np.exp(rng.normal(0, 0.08, size=3))
    t2 = np.tensordot(levels, tissue, axes=1).astype(np.float32)
    if not anatomy.skull_stripped:  # scalp and skull: a dim copy of the T1 outside the brain
        t2 = np.where(brain, t2, 0.35 * t1).astype(np.float32)

    lesions: list = []
    lesion_mask = np.zeros(grid.shape, np.uint8)
    if lesion_config is not None:
        t1, t2, lesion_mask, lesions = simulate_lesions(
            t1, t2, tissue[2], brain, grid.spacing, rng, lesion_config
        )

    bias_control = (4, 4, 4)
    noise_sigma = float(rng.uniform(*config.noise_range))
    t1 = t1 * np.exp(config.bias_amplitude * smooth_random_field(grid.shape, bias_control, rng))
    t2 = t2 * np.exp(config.bias_amplitude * smooth_random_field(grid.shape, bias_control, rng))
    t1, t2 = rician(t1, noise_sigma, rng), rician(t2, noise_sigma, rng)

    labels = np.where(brain, np.argmax(tissue, axis=0) + 1, 0).astype(np.uint8)
    return Subject(
        t1=(t1 * 1000).astype(np.float32),
        t2=(t2 * 1000).astype(np.float32),
        brain_mask=brain.astype(np.uint8),
        lesion_mask=lesion_mask,
        tissue_labels=labels,
        grid=grid,
        lesions=lesions,
        subject_to_anatomy=subject_to_anatomy,
    )
