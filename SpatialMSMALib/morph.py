"""Shape morphs between real anatomies: a training-cohort augmentation.

A cohort built from a handful of real anatomies knows a handful of brain shapes, each seen
through small random deformations. A morph gives shapes in between: anatomy A resampled
part of the way towards the shape of anatomy B, keeping A's own tissue and texture.

The field is found once per ordered pair (A, B) on a coarse grid in A's space: both
anatomies are rendered with one tissue contrast (so the two T1 contrasts do not matter), B
is registered affinely onto A (Mattes MI over the brain and a 10 mm margin), and A is
registered deformably to that (fast symmetric-forces demons). With ``u`` the demons
displacement, ``A(x + u(x))`` has B's shape; the morph of weight ``w`` samples
``A(x + w u(x))`` (:func:`morph_coordinates`). Pure numerics apart from the SimpleITK
registrations; deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import Anatomy
from .geometry import apply_affine_to_coordinates
from .registration import reduce_to_spacing, register_affine, register_demons

#: T1-like rendering of the tissue maps (CSF, GM, WM) both anatomies are registered on
TISSUE_CONTRAST = (0.25, 0.6, 1.0)


@dataclass
class MorphField:
    """Displacement that takes ``source`` to the shape of ``target``, in ``source``'s space.

    Attributes:
        source, target: anatomy names.
        displacement_mm: ``(3, X, Y, Z)`` float32, RAS mm, on the grid ``affine``: the point
            ``p`` of the morphed anatomy shows the source tissue found at ``p + d(p)``.
        affine: 4x4 voxel -> RAS mm of that grid (the source anatomy's RAS space).
    """

    source: str
    target: str
    displacement_mm: np.ndarray
    affine: np.ndarray


def tissue_image(anatomy: Anatomy) -> np.ndarray:
    """``(I, J, K)`` float32 rendering of the tissue maps with :data:`TISSUE_CONTRAST`;
    zero outside the brain."""
    return np.tensordot(np.asarray(TISSUE_CONTRAST, np.float32), anatomy.tissue, axes=1)


def morph_field(
    source: Anatomy,
    target: Anatomy,
    spacing_mm: float = 2.0,
    iterations: int = 100,
    smoothing_vox: float = 2.0,
) -> MorphField:
    """The :class:`MorphField` from ``source`` to ``target``, computed at ``spacing_mm``.

    ``smoothing_vox`` is the demons regulariser (Gaussian SD, voxels of that grid)."""
    fixed, fixed_affine = reduce_to_spacing(tissue_image(source), source.affine, spacing_mm)
    fixed_mask, _ = reduce_to_spacing(source.brain_mask.astype(np.float32), source.affine,
                                      spacing_mm)
    # the metric's region reaches 10 mm past the brain: with the brain alone MI prefers
    # scaling the target up (measured: x1.10 between two same-size toy brains, identity with
    # the margin)
    margin = max(1, int(round(10.0 / spacing_mm)))
    metric_region = ndimage.binary_dilation(fixed_mask > 0.5, iterations=margin)
    moving, moving_affine = reduce_to_spacing(tissue_image(target), target.affine, spacing_mm)
    source_to_target = register_affine(fixed, fixed_affine, metric_region, moving,
                                       moving_affine, dof="affine")
    to_moving_voxel = np.linalg.inv(moving_affine) @ source_to_target @ fixed_affine
    grid = np.indices(fixed.shape, dtype=np.float32)
    points = apply_affine_to_coordinates(to_moving_voxel, grid)
    target_on_source = ndimage.map_coordinates(moving, points, order=1, mode="constant",
                                               cval=0.0).astype(np.float32)
    displacement_vox = register_demons(fixed, target_on_source, iterations, smoothing_vox)
    displacement_mm = np.einsum("ij,j...->i...", fixed_affine[:3, :3], displacement_vox)
    return MorphField(source.name, target.name, displacement_mm.astype(np.float32),
                      np.asarray(fixed_affine, float))


def morph_coordinates(coords: np.ndarray, anatomy_affine: np.ndarray, field: MorphField,
                      weight: float) -> np.ndarray:
    """Voxel coordinates into the source anatomy ``(3, ...)`` -> those of its morph of
    ``weight`` (0: unchanged, 1: the target's shape): ``c + w u(c)``, with ``u`` the field
    interpolated at ``c`` and converted to the anatomy's voxels (``anatomy_affine``: voxel ->
    RAS mm)."""
    to_field = np.linalg.inv(field.affine) @ anatomy_affine
    at = apply_affine_to_coordinates(to_field, coords)
    shift_mm = np.stack([ndimage.map_coordinates(d, at, order=1, mode="nearest")
                         for d in field.displacement_mm])
    shift_vox = np.einsum("ij,j...->i...", np.linalg.inv(anatomy_affine[:3, :3]), shift_mm)
    return (coords + weight * shift_vox).astype(coords.dtype, copy=False)
