"""Segmentation QC pieces: corruptions with known severity and the Dice they cause."""

from __future__ import annotations

import numpy as np
import pytest

from SpatialMSMALib.segqc.corruptions import CORRUPTIONS, corrupt, mean_dice


def _phantom(shape=(40, 44, 40)) -> np.ndarray:
    """Nested ellipsoids: WM core, GM shell, CSF rim, background outside."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    labels = np.zeros(shape, np.uint8)
    labels[r < 0.9] = 1
    labels[r < 0.8] = 2
    labels[r < 0.55] = 3
    return labels


def test_mean_dice_values():
    a = _phantom()
    assert mean_dice(a, a) == 1.0
    b = a.copy()
    b[a == 1] = 0  # CSF gone: Dice 0 for CSF, 1 for GM and WM
    assert mean_dice(a, b) == pytest.approx(2 / 3)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_changes_the_map_more_with_severity(kind):
    clean = _phantom()
    dices = []
    for severity in (0.2, 1.0):
        # average over seeds: location and label choices are random
        values = [mean_dice(clean, corrupt(clean, kind, severity, np.random.default_rng(s)))
                  for s in range(4)]
        dices.append(np.mean(values))
    assert dices[0] < 1.0
    assert dices[1] < dices[0]
    out = corrupt(clean, kind, 0.5, np.random.default_rng(0))
    assert out.shape == clean.shape and out.dtype == clean.dtype
    assert set(np.unique(out)) <= {0, 1, 2, 3}


def test_corruptions_do_not_modify_their_input_and_are_seeded():
    clean = _phantom()
    copy = clean.copy()
    a = corrupt(clean, "swap", 0.7, np.random.default_rng(3))
    b = corrupt(clean, "swap", 0.7, np.random.default_rng(3))
    assert np.array_equal(clean, copy) and np.array_equal(a, b)


def test_specific_corruption_semantics():
    clean = _phantom()
    rng = np.random.default_rng(0)
    shifted = corrupt(clean, "shift", 1.0, rng)  # 4 voxels along one axis
    moved = [np.array_equal(np.roll(clean, s, axis=ax)[tuple(
        slice(4, -4) if i == ax else slice(None) for i in range(3))], shifted[tuple(
            slice(4, -4) if i == ax else slice(None) for i in range(3))])
        for ax in range(3) for s in (4, -4)]
    assert any(moved)
    holed = corrupt(clean, "missing", 0.5, np.random.default_rng(1))
    assert (holed > 0).sum() < (clean > 0).sum() and not (holed[clean == 0]).any()
    noisy = corrupt(clean, "noise", 1.0, np.random.default_rng(2))
    changed = (noisy != clean)[clean > 0].mean()
    assert 0.15 < changed < 0.3  # 30% relabelled at random, two thirds to another label
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(clean, "melt", 0.5, rng)
    with pytest.raises(ValueError, match="severity"):
        corrupt(clean, "noise", 0.0, rng)


def test_baselines_rank_damaged_maps_above_clean_ones():
    from SpatialMSMALib.segqc.baselines import AtlasDice, VolumeZScore

    rng = np.random.default_rng(0)
    # "good" maps: the phantom with small random shifts of its centre (anatomical variation)
    good = [np.roll(_phantom(), tuple(rng.integers(-1, 2, 3)), axis=(0, 1, 2))
            for _ in range(12)]
    clean = np.roll(_phantom(), (1, 0, 0), axis=(0, 1, 2))
    damaged = corrupt(clean, "missing", 1.0, np.random.default_rng(5))
    for baseline in (VolumeZScore().fit(good), AtlasDice().fit(good)):
        assert baseline.score(damaged) > baseline.score(clean)
    atlas = AtlasDice().fit(good)
    assert set(np.unique(atlas.atlas)) == {0, 1, 2, 3}
    assert atlas.score(_phantom()) < 0.15  # thin CSF rim: one-voxel shifts cost some Dice


def test_cohort_label_maps_land_on_the_model_grid_inside_the_brain(tmp_path):
    from SpatialMSMALib.cohort import CohortSizes, make_benchmark
    from SpatialMSMALib.dataset import manifest_scans, model_space
    from SpatialMSMALib.segqc.data import cohort_label_maps
    from SpatialMSMALib.synthesis import SubjectConfig

    sizes = CohortSizes(n_train=1, n_val=0, n_test_healthy=0, n_test_lesioned=0,
                        n_loao_healthy=0, n_loao_lesioned=0)
    manifest = make_benchmark(tmp_path / "cohort", sizes=sizes, seed=3, progress=False,
                              subject_config=SubjectConfig(spacing_mm=4.0))
    cache = tmp_path / "cache"
    maps = cohort_label_maps(manifest, ("train",), cache, spacing=4.0, progress=False)
    (subject, labels), = maps["train"]
    assert subject == "train_000" and labels.dtype == np.uint8
    assert labels.shape == (48, 56, 48)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    brain = model_space(manifest_scans(manifest, ("train",))["train"], cache, 4.0,
                        progress=False)[0].brain_mask
    # the tissue map and the brain mask were carried by the same mapping
    overlap = 2 * ((labels > 0) & brain).sum() / ((labels > 0).sum() + brain.sum())
    assert overlap > 0.9
