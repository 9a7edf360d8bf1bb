"""Affine registration of a scan to the template with SimpleITK.

Images are handed to SimpleITK with their geometry converted from RAS (ours) to LPS (ITK's);
the result is returned as a 4x4 RAS world transform ``model_to_native``: it maps a point of
the template/model space (MNI RAS mm) to the corresponding point of the native scan (RAS mm).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import numpy as np
import SimpleITK as sitk

_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS

_single_thread_lock = threading.Lock()
_single_thread_users = 0
_saved_thread_count: int | None = None


@contextmanager
def single_threaded_itk():
    """Run the enclosed SimpleITK work with ITK's global default of one thread per filter.

    ITK's multi-threaded Mattes-MI registration (v4 metric, random sampling, SimpleITK 2.5 /
    ITK 5.4) is not reproducible run to run: the same scan registered twice in one process on
    2 threads gave transforms differing by ~1e-5 in the matrix and ~4e-4 mm in translation,
    enough to move downstream scores in the 4th digit. With one thread it is bit-identical.
    (Setting the method's own thread count is not enough: its metric still used the global
    default.) Callers that want the cores back run independent registrations in parallel
    Python threads (SimpleITK releases the GIL), as :func:`preprocessing.register_to_template`
    does. Re-entrant and safe across threads: the previous global default is restored when the
    last user leaves.
    """
    global _single_thread_users, _saved_thread_count
    with _single_thread_lock:
        if _single_thread_users == 0:
            _saved_thread_count = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _single_thread_lock:
            _single_thread_users -= 1
            if _single_thread_users == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_saved_thread_count)


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """numpy ``(I, J, K)`` + voxel->RAS affine -> SimpleITK image (LPS physical space)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    lps = _FLIP @ np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def from_sitk(image: sitk.Image) -> np.ndarray:
    """SimpleITK image -> numpy ``(I, J, K)`` (geometry is the caller's)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _matrix_of(transform) -> np.ndarray:
    """4x4 LPS matrix of a SimpleITK matrix-offset transform (p -> A (p - c) + c + t)."""
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c = np.asarray(transform.GetCenter())
    t = np.asarray(transform.GetTranslation())
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = t + c - a @ c
    return m


def normalized_cross_correlation(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray, smooth_voxels: float = 1.0
) -> float:
    """Pearson correlation of ``a`` and ``b`` over ``mask`` after Gaussian smoothing of both
    (``smooth_voxels`` SD; reduces the effect of noise). 0 when either is constant."""
    from scipy import ndimage

    if smooth_voxels > 0:
        a = ndimage.gaussian_filter(a.astype(np.float32), smooth_voxels)
        b = ndimage.gaussian_filter(b.astype(np.float32), smooth_voxels)
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def register_affine(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_mask: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    moving_mask: np.ndarray | None = None,
    dof: str = "affine",
    initial_model_to_native: np.ndarray | None = None,
    seed: int = 1,
    gradient_filters: bool = False,
) -> np.ndarray:
    """One Mattes-MI registration stage: ``dof`` "rigid" (6) or "affine" (12 parameters).

    ``fixed`` is the template on the model grid, ``moving`` the native scan. Starts from
    ``initial_model_to_native`` (4x4 RAS; must be a rotation + translation for "rigid") or,
    when ``None``, from the alignment of image moments. Returns the 4x4 RAS transform
    model -> native. Multi-resolution (shrink 4/2/1), metric sampled at 15% of the fixed mask
    with a fixed seed (``seed`` must be > 0: SimpleITK reads 0 as "seed from the clock").
    Image gradients are computed at the sampled points only (no whole-image gradient filter:
    on a 1 mm head that filter took half of the time), unless ``gradient_filters`` (how
    preprocessing version 1 ran). Callers pass a moving image reduced to about the fixed grid's
    spacing (:func:`reduce_to_spacing`), which the metric cannot resolve beyond anyway.
    Runs single-threaded (:func:`single_threaded_itk`), so the same inputs give the same
    transform bit for bit.
    """
    fixed_image = to_sitk(fixed.astype(np.float32), fixed_affine)
    moving_image = to_sitk(moving.astype(np.float32), moving_affine)
    fixed_mask_image = to_sitk(fixed_mask.astype(np.uint8), fixed_affine)

    if dof not in ("rigid", "affine"):
        raise ValueError(f"dof must be rigid or affine, not {dof}")
    if initial_model_to_native is None:
        transform = sitk.CenteredTransformInitializer(
            fixed_image,
            moving_image,
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        if dof == "affine":
            transform = _as_affine(transform)
    else:
        lps = _FLIP @ np.asarray(initial_model_to_native, float) @ _FLIP
        transform = sitk.Euler3DTransform() if dof == "rigid" else sitk.AffineTransform(3)
        transform.SetMatrix(lps[:3, :3].flatten().tolist())
        transform.SetTranslation(lps[:3, 3].tolist())

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    if seed <= 0:
        raise ValueError("seed must be positive (0 means a wall-clock seed in SimpleITK)")
    method.SetMetricSamplingPercentage(0.15, seed)
    method.SetMetricFixedMask(fixed_mask_image)
    method.SetMetricUseFixedImageGradientFilter(gradient_filters)
    method.SetMetricUseMovingImageGradientFilter(gradient_filters)
    if moving_mask is not None:
        method.SetMetricMovingMask(to_sitk(moving_mask.astype(np.uint8), moving_affine))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=200,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    with single_threaded_itk():
        method.Execute(fixed_image, moving_image)
    return _FLIP @ _matrix_of(transform) @ _FLIP


def reduce_to_spacing(image: np.ndarray, affine: np.ndarray, spacing_mm: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased integer subsampling of ``image`` ``(I, J, K)`` (voxel -> RAS ``affine``)
    so that no axis is finer than about ``spacing_mm``: axis ``a`` with voxel size ``d_a`` is
    smoothed with a Gaussian of SD ``0.4 f_a`` voxels and kept every ``f_a = floor(spacing_mm /
    d_a)``-th voxel (``f_a = 1``: untouched). Returns ``(reduced float32, its affine)``; voxel
    ``i`` of the result is voxel ``f * i`` of the input, so the affine stays exact."""
    from scipy import ndimage

    voxel = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    factors = np.maximum(1, np.floor(spacing_mm / voxel + 1e-6)).astype(int)
    if np.all(factors == 1):
        return np.asarray(image, np.float32), np.asarray(affine, float)
    sigma = [0.4 * f if f > 1 else 0.0 for f in factors]
    smooth = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma)
    reduced = smooth[:: factors[0], :: factors[1], :: factors[2]]
    scaled = np.asarray(affine, float).copy()
    scaled[:3, :3] = scaled[:3, :3] * factors
    return np.ascontiguousarray(reduced), scaled


def _as_affine(rigid) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


def n4_bias_correction(
    image: np.ndarray, affine: np.ndarray, mask: np.ndarray, shrink: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction (SimpleITK), fitted on a ``shrink``-times smaller image.

    Returns ``(corrected, bias_field)``, both ``(I, J, K)`` float32; ``image = corrected *
    bias_field``. The bias field is estimated inside ``mask``.
    """
    positive = np.clip(image.astype(np.float32), 1e-3 * max(float(image.max()), 1e-6), None)
    sitk_image = to_sitk(positive, affine)
    sitk_mask = to_sitk(mask.astype(np.uint8), affine)
    factors = [int(max(1, min(shrink, s // 16))) for s in image.shape]
    small = sitk.Shrink(sitk_image, factors)
    small_mask = sitk.Shrink(sitk_mask, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50, 40, 30])
    n4.Execute(small, small_mask)
    log_bias = from_sitk(n4.GetLogBiasFieldAsImage(sitk_image)).astype(np.float32)
    bias = np.exp(log_bias)
    return (image / bias).astype(np.float32), bias


def register_demons(
    moving: np.ndarray,
    fixed: np.ndarray,
    iterations: int = 50,
    smoothing_voxels: float = 2.0,
    on_iteration=None,
) -> np.ndarray:
    """Deformable registration of two images on the same grid (e.g. a model-space T1 to the
    template T1, both normalised alike) with SimpleITK's fast symmetric-forces demons.

    ``moving`` and ``fixed`` are ``(X, Y, Z)``; ``smoothing_voxels`` is the SD of the Gaussian
    that regularises the displacement field after each of the ``iterations``. Returns the
    displacement ``u`` as ``(3, X, Y, Z)`` float32 in voxels of that grid, defined on the fixed
    image: the warped image is ``moving(x + u(x))`` (:func:`warp`). Deterministic.

    ``on_iteration(done, iterations)``, when given, is called after every iteration; an
    exception it raises (a GUI's ``Cancelled``) stops the registration and is re-raised here.
    """
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} differ in shape")
    if iterations < 1 or smoothing_voxels <= 0:
        raise ValueError("iterations must be >= 1 and smoothing_voxels > 0")

    def image(a):  # voxel space: spacing 1, identity direction, so the field is in voxels
        return sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0), np.float32))

    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(int(iterations))
    demons.SetStandardDeviations(float(smoothing_voxels))
    raised: list[BaseException] = []
    if on_iteration is not None:
        def after_iteration():
            if raised:
                return
            try:
                on_iteration(int(demons.GetElapsedIterations()), int(iterations))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller below
                raised.append(e)
                demons.Abort()

        demons.AddCommand(sitk.sitkIterationEvent, after_iteration)
    try:
        field = demons.Execute(image(fixed), image(moving))
    except RuntimeError:
        if raised:  # ITK reports the abort as an error: give back the caller's exception
            raise raised[0] from None
        raise
    if raised:
        raise raised[0]
    return np.ascontiguousarray(
        sitk.GetArrayFromImage(field).transpose(3, 2, 1, 0), dtype=np.float32)


def warp(volume: np.ndarray, displacement: np.ndarray, order: int = 1,
         fill: float = 0.0) -> np.ndarray:
    """``volume(x + displacement(x))``: ``volume`` ``(X, Y, Z)`` (or ``(C, X, Y, Z)``, each
    channel alike), ``displacement`` ``(3, X, Y, Z)`` in voxels; ``order`` 1 (linear) or 0
    (nearest, for labels); points outside the volume get ``fill``."""
    from scipy import ndimage

    if volume.ndim == 4:
        return np.stack([warp(c, displacement, order, fill) for c in volume])
    grid = np.indices(volume.shape, dtype=np.float32)
    return ndimage.map_coordinates(volume, grid + displacement, order=order, mode="constant",
                                   cval=fill).astype(volume.dtype, copy=False)


def invert_displacement(displacement: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Inverse ``v`` of a displacement field ``u`` (``(3, X, Y, Z)``, voxels): the field with
    ``y + v(y) = x`` where ``x + u(x) = y``, found by the fixed-point iteration
    ``v(y) = -u(y + v(y))`` (converges for smooth fields with Jacobian > 0, as the demons'
    are). ``warp(warp(a, u), v) ~= a`` away from the borders. The three components are
    interpolated in parallel threads (SciPy releases the GIL in ``map_coordinates``): the
    same result bit for bit, in about half the time on 2 cores."""
    from scipy import ndimage

    grid = np.indices(displacement.shape[1:], dtype=np.float32)
    inverse = -displacement.copy()
    with ThreadPoolExecutor(len(displacement)) as pool:
        for _ in range(iterations):
            points = grid + inverse
            at_points = partial(ndimage.map_coordinates, coordinates=points, order=1,
                                mode="nearest")
            inverse = -np.stack(list(pool.map(at_points, displacement)))
    return inverse.astype(np.float32)
