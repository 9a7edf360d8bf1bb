"""Grids, world transforms and resampling (pure numpy/scipy).

A *grid* is a shape ``(I, J, K)`` plus a voxel->RAS affine. A *world transform* is a 4x4
matrix acting on RAS mm coordinates. ``resample`` fills an output grid by pulling values from
a source grid: for an output voxel ``v`` it reads the source at
``inv(source_affine) @ world_transform @ output_affine @ v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (I, J, K) and ``affine`` (4x4, voxel index -> RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "affine": np.asarray(self.affine).tolist()}

    @staticmethod
    def from_dict(d: dict) -> Grid:
        return Grid(tuple(int(s) for s in d["shape"]), np.asarray(d["affine"], dtype=float))


def centered_grid(center_ras: np.ndarray, spacing_mm: float, shape: tuple[int, int, int]) -> Grid:
    """An axis-aligned RAS grid of ``shape`` voxels of ``spacing_mm`` centred at ``center_ras``."""
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    half_extent = (np.asarray(shape, dtype=float) - 1) / 2 * spacing_mm
    affine[:3, 3] = np.asarray(center_ras, dtype=float) - half_extent
    return Grid(tuple(int(s) for s in shape), affine)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 ``matrix`` to ``points`` of shape ``(N, 3)``; returns ``(N, 3)``."""
    points = np.asarray(points, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def apply_affine_to_coordinates(matrix: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Apply a 4x4 ``matrix`` to coordinate arrays ``(3, ...)`` (e.g. ``np.indices`` of a
    grid); returns ``(3, ...)``. The array counterpart of :func:`apply_affine`."""
    return np.einsum("ij,j...->i...", matrix[:3, :3], coords) + matrix[:3, 3].reshape(
        (3,) + (1,) * (coords.ndim - 1))


def resample(
    source: np.ndarray,
    source_affine: np.ndarray,
    output: Grid,
    world_transform: np.ndarray | None = None,
    *,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Resample ``source`` (shape ``(I, J, K)``) onto ``output``.

    Args:
        source: the array to read from.
        source_affine: its voxel->RAS affine.
        output: the grid to fill.
        world_transform: 4x4 map from output-grid RAS points to source RAS points
            (identity when ``None``).
        order: spline order (0 nearest for labels, 1 linear, 3 cubic).
        fill: value for points outside the source.
    Returns:
        array of shape ``output.shape``, float32 (or the source dtype for ``order=0``).
    """
    world = np.eye(4) if world_transform is None else np.asarray(world_transform, dtype=float)
    index_map = np.linalg.inv(source_affine) @ world @ output.affine
    out_dtype = source.dtype if order == 0 else np.float32
    src = source if order == 0 else np.asarray(source, dtype=np.float32)
    return ndimage.affine_transform(
        src,
        index_map[:3, :3],
        offset=index_map[:3, 3],
        output_shape=output.shape,
        order=order,
        mode="constant",
        cval=fill,
        prefilter=order > 1,
        output=out_dtype,
    )


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """3x3 rotation from Euler angles (about x, then y, then z), radians."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine_about_point(
    linear: np.ndarray, translation: np.ndarray, center: np.ndarray
) -> np.ndarray:
    """4x4 world transform ``p -> linear @ (p - center) + center + translation``."""
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = center + translation - linear @ center
    return m
