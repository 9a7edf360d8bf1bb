"""The MNI ICBM152 2009a template (shipped by nilearn) and the model grid defined on it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .geometry import Grid, centered_grid, resample

#: default model grid: 2 mm, 96 x 112 x 96 voxels (192 x 224 x 192 mm), centred on the
#: template's brain bounding box
DEFAULT_SPACING_MM = 2.0
DEFAULT_SHAPE = (96, 112, 96)


@dataclass(frozen=True)
class Template:
    """Template T1 (skull-stripped, max 1), brain mask and WM map on a given grid."""

    grid: Grid
    t1: np.ndarray
    brain_mask: np.ndarray
    white_matter: np.ndarray


@lru_cache(maxsize=1)
def _template_1mm():
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    return (
        np.asarray(t1.get_fdata(), np.float32),
        np.asarray(mask.get_fdata(), np.float32),
        np.asarray(wm.get_fdata(), np.float32),
        np.asarray(t1.affine, float),
    )


@lru_cache(maxsize=1)
def template_brain_center() -> tuple[float, float, float]:
    """Centre (RAS mm) of the bounding box of the template's brain mask."""
    _, mask, _, affine = _template_1mm()
    idx = np.argwhere(mask > 0.5)
    center_index = (idx.min(0) + idx.max(0)) / 2
    return tuple(float(v) for v in affine[:3, :3] @ center_index + affine[:3, 3])


def model_grid(spacing_mm: float = DEFAULT_SPACING_MM, shape=DEFAULT_SHAPE) -> Grid:
    """The model grid: axis-aligned MNI (RAS) grid centred on the template brain."""
    return centered_grid(np.asarray(template_brain_center()), spacing_mm, tuple(shape))


@lru_cache(maxsize=4)
def template_on_grid(spacing_mm: float = DEFAULT_SPACING_MM, shape=DEFAULT_SHAPE) -> Template:
    """The template resampled (linear) onto :func:`model_grid`."""
    t1, mask, wm, affine = _template_1mm()
    grid = model_grid(spacing_mm, tuple(shape))
    return Template(
        grid=grid,
        t1=resample(t1, affine, grid, order=1),
        brain_mask=resample(mask, affine, grid, order=1) > 0.5,
        white_matter=resample(wm, affine, grid, order=1),
    )
