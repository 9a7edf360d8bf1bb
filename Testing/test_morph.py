"""Shape morphs between anatomies (SpatialMSMALib.morph) and their use in the cohort."""

import numpy as np
import pytest
from scipy import ndimage

from SpatialMSMALib.anatomy import Anatomy
from SpatialMSMALib.cohort import MORPH_WEIGHT_RANGE, CohortSizes, plan_cohort
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.morph import morph_coordinates, morph_field, tissue_image
from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject

SHAPE, SPACING = (44, 44, 44), 2.0


def toy_anatomy(name: str, core_shift_mm: float) -> Anatomy:
    """A 2 mm ball brain (radius 30 mm): WM core of radius 16 mm shifted by
    ``core_shift_mm`` along x, GM around it, a CSF rim. Moving the core and not the outline
    is a shape change no affine map explains."""
    affine = np.diag([SPACING] * 3 + [1.0])
    affine[:3, 3] = -SPACING * (np.array(SHAPE) - 1) / 2
    points = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(SHAPE, dtype=float))
    points += affine[:3, 3, None, None, None]
    radius = np.linalg.norm(points, axis=0)
    core = np.linalg.norm(points - np.array([core_shift_mm, 0, 0])[:, None, None, None], axis=0)
    brain = radius < 30
    wm = ndimage.gaussian_filter((core < 16).astype(float), 0.7) * brain
    csf = ndimage.gaussian_filter((radius > 26).astype(float), 0.7) * brain * (1 - wm)
    gm = np.clip(brain - wm - csf, 0, 1)
    tissue = np.stack([csf, gm, wm]).astype(np.float32)
    anatomy = Anatomy(name, np.zeros(SHAPE, np.float32), brain, tissue, affine, True)
    anatomy.t1 = tissue_image(anatomy)
    return anatomy


@pytest.fixture(scope="module")
def pair():
    source, target = toy_anatomy("a", 0.0), toy_anatomy("b", 7.0)
    return source, target, morph_field(source, target, spacing_mm=SPACING, iterations=80,
                                       smoothing_vox=1.5)


def morphed(source: Anatomy, field, weight: float) -> np.ndarray:
    coords = np.indices(SHAPE, dtype=np.float32)
    return ndimage.map_coordinates(
        source.t1, morph_coordinates(coords, source.affine, field, weight), order=1)


def test_morph_moves_the_source_shape_towards_the_target(pair):
    source, target, field = pair
    assert field.displacement_mm.shape == (3, *SHAPE)
    inside = source.brain_mask & target.brain_mask

    def error(image):
        return float(np.abs(image - target.t1)[inside].mean())

    unchanged, half, full = (error(morphed(source, field, w)) for w in (0.0, 0.5, 1.0))
    assert np.array_equal(morphed(source, field, 0.0), ndimage.map_coordinates(
        source.t1, np.indices(SHAPE, dtype=np.float32), order=1))
    assert full < 0.5 * unchanged  # the core moved to the target's place
    assert full < half < unchanged  # a weight between gives a shape between
    # the core's centre of mass moves by about the 7 mm shift along x, not along y or z
    wm = ndimage.map_coordinates(source.tissue[2], morph_coordinates(
        np.indices(SHAPE, dtype=np.float32), source.affine, field, 1.0), order=1)
    shift_vox = np.array(ndimage.center_of_mass(wm)) - np.array(
        ndimage.center_of_mass(source.tissue[2]))
    assert 4.0 < shift_vox[0] * SPACING < 8.0
    assert np.all(np.abs(shift_vox[1:] * SPACING) < 1.0)


def test_morph_in_subject_synthesis(pair):
    source, target, field = pair
    config = SubjectConfig(spacing_mm=SPACING, deformation_mm=0.0)
    plain = synthesize_subject(source, 5, config)
    weight0 = synthesize_subject(source, 5, config, morph=(field, 0.0))
    full = synthesize_subject(source, 5, config, morph=(field, 1.0))
    np.testing.assert_array_equal(plain.t1, weight0.t1)  # same random draws
    assert not np.array_equal(plain.tissue_labels, full.tissue_labels)
    with pytest.raises(ValueError, match="morph field of 'a' given for 'b'"):
        synthesize_subject(target, 5, config, morph=(field, 1.0))


def test_plan_morphs_only_training_subjects_towards_training_anatomies():
    names = ["mni152_2009a", "colin27", "robex_reference"]
    sizes = CohortSizes(20, 6, 3, 3, 2, 2)
    plain, holdout = plan_cohort(names, sizes, seed=3)
    planned, _ = plan_cohort(names, sizes, seed=3, morph_fraction=0.5)
    assert holdout == "colin27"
    morphed_records = [r for r in planned if "morph_target" in r]
    assert 5 <= len(morphed_records) <= 21  # about half of 26 train/val subjects
    for record in morphed_records:
        assert record["split"] in ("train", "val")
        assert record["morph_target"] not in (record["anatomy"], "colin27")
        assert MORPH_WEIGHT_RANGE[0] <= record["morph_weight"] <= MORPH_WEIGHT_RANGE[1]
    # everything else of the plan is unchanged, and the plan is reproducible
    strip = [{k: v for k, v in r.items() if not k.startswith("morph")} for r in planned]
    assert strip == plain
    assert plan_cohort(names, sizes, seed=3, morph_fraction=0.5)[0] == planned
    every = plan_cohort(names, sizes, seed=3, morph_fraction=1.0)[0]
    assert sum("morph_target" in r for r in every) == 26
    with pytest.raises(InputError, match="morph fraction"):
        plan_cohort(names, sizes, seed=3, morph_fraction=1.5)
    with pytest.raises(InputError, match="at least two training anatomies"):
        plan_cohort(["mni152_2009a"], sizes, seed=3, morph_fraction=0.5)


def test_make_benchmark_with_morphs(tmp_path, monkeypatch):
    """The cohort writer computes each needed pair's field once, morphs only the planned
    train/val subjects and records the pairs; the test splits keep their bytes."""
    import SpatialMSMALib.cohort as cohort

    shifts = {"mni152_2009a": 0.0, "mni152nlin6asym": 6.0, "robex_reference": -5.0}
    monkeypatch.setattr(cohort, "available_anatomies", lambda _: list(shifts))
    monkeypatch.setattr(cohort, "load_anatomy", lambda name, _: toy_anatomy(name, shifts[name]))
    sizes = CohortSizes(4, 2, 1, 0, 1, 0)
    config = SubjectConfig(spacing_mm=SPACING)
    kwargs = dict(sizes=sizes, seed=1, subject_config=config, progress=False)
    plain = cohort.load_manifest(cohort.make_benchmark(tmp_path / "plain", **kwargs))
    morphs = cohort.load_manifest(
        cohort.make_benchmark(tmp_path / "morph", morph_fraction=1.0, **kwargs))
    assert morphs["holdout_anatomy"] == "robex_reference"
    assert morphs["morph"]["fraction"] == 1.0
    assert morphs["morph"]["pairs"] == ["mni152_2009a->mni152nlin6asym",
                                        "mni152nlin6asym->mni152_2009a"]
    assert plain["morph"]["pairs"] == []
    for before, after in zip(plain["subjects"], morphs["subjects"], strict=True):
        t1_before = (tmp_path / "plain" / before["t1"]).read_bytes()
        t1_after = (tmp_path / "morph" / after["t1"]).read_bytes()
        if after["split"] in ("train", "val"):
            assert after["morph_target"] != after["anatomy"]
            assert t1_before != t1_after
        else:
            assert "morph_target" not in after
            assert t1_before == t1_after
