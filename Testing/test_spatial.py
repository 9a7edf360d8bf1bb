"""Spatial-MSMA: flow, calibration, post-processing, trainer resume, model file, detection."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import tiny_spatial_config as _config

from SpatialMSMALib.spatial import (
    Calibration,
    SpatialFlow,
    SpatialFlowConfig,
    grid_context,
    intensity_reference_mask,
    label_anomalies,
    multiscale_intensities,
    normalised_positions,
    parse_levels,
    positional_encoding,
    referenced_intensities,
    smooth_in_region,
)
from SpatialMSMALib.spatial_training import LocationSet, SpatialTrainer


def test_positional_encoding_values():
    positions = torch.tensor([[0.0, 0.5, -1.0]])
    enc = positional_encoding(positions, 2)
    assert enc.shape == (1, 3 + 12)
    torch.testing.assert_close(enc[0, :3], positions[0])
    torch.testing.assert_close(enc[0, 3:6], torch.sin(torch.pi * positions[0]))
    torch.testing.assert_close(enc[0, 9:12], torch.sin(2 * torch.pi * positions[0]))
    corners = normalised_positions(torch.tensor([[0, 0, 0], [9, 4, 1]]), (10, 5, 2))
    torch.testing.assert_close(corners, torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))


def test_calibration_thresholds_are_healthy_quantiles(rng):
    values = [rng.normal(size=50_000) for _ in range(4)]
    cal = Calibration.from_healthy(values)
    pooled = np.concatenate(values)
    threshold = cal.threshold_for_fpr(0.01)
    assert np.mean(pooled >= threshold) == pytest.approx(0.01, abs=5e-4)
    assert cal.fpr_of_score(threshold) == pytest.approx(0.01, rel=0.02)
    assert cal.fpr_of_score(cal.threshold_for_fpr(1e-4)) == pytest.approx(1e-4, rel=0.05)
    assert cal.fpr_of_score(-100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        cal.threshold_for_fpr(2.0)


def test_label_anomalies_sizes_order_and_minimum():
    heat = np.zeros((20, 20, 20), np.float32)
    heat[2:5, 2:5, 2:5] = 3.0  # 27 voxels, peak 3
    heat[10:14, 10:14, 10:14] = 2.0  # 64 voxels, peak 5 at one voxel
    heat[12, 12, 12] = 5.0
    heat[18, 18, 18] = 9.0  # single voxel: below the minimum size
    region = np.ones(heat.shape, bool)
    labels, count = label_anomalies(heat, region, 1.0, (2.0, 2.0, 2.0), min_component_ml=0.1)
    assert count == 2  # 0.1 mL = 12.5 voxels of 8 mm^3
    assert (labels == 1).sum() == 64 and labels[12, 12, 12] == 1  # highest peak first
    assert (labels == 2).sum() == 27
    assert labels[18, 18, 18] == 0
    region[:, :, :8] = False  # outside the region nothing is flagged
    labels, count = label_anomalies(heat, region, 1.0, (2.0, 2.0, 2.0), 0.1)
    assert count == 1 and labels[3, 3, 3] == 0


def test_label_anomalies_hysteresis_keeps_only_components_whose_peak_is_strong():
    heat = np.zeros((20, 20, 20), np.float32)
    heat[2:6, 2:6, 2:6] = 2.0  # 64 voxels, flat: peak 2
    heat[10:14, 10:14, 10:14] = 2.0  # 64 voxels with one strong voxel: peak 6
    heat[11, 11, 11] = 6.0
    region = np.ones(heat.shape, bool)
    labels, count = label_anomalies(heat, region, 1.0, (2.0,) * 3, 0.1, min_peak=5.0)
    assert count == 1
    # the kept component keeps its whole extent at the operating threshold, not just the
    # voxels above the peak threshold
    assert (labels == 1).sum() == 64 and labels[13, 13, 13] == 1 and labels[3, 3, 3] == 0
    assert label_anomalies(heat, region, 1.0, (2.0,) * 3, 0.1, min_peak=7.0)[1] == 0
    assert label_anomalies(heat, region, 1.0, (2.0,) * 3, 0.1, min_peak=None)[1] == 2


def test_calibration_peak_threshold_is_the_stricter_of_the_two(rng):
    values = [rng.normal(size=50_000) for _ in range(4)]
    cal = Calibration.from_healthy(values, max_peak_fpr=1e-3)
    strict = cal.threshold_for_fpr(1e-3)
    assert cal.peak_threshold(cal.default_threshold) == pytest.approx(strict)
    # normal quantiles: 3.09 standard deviations at 0.1%, 2.33 at 1%
    assert strict == pytest.approx(3.09, abs=0.1)
    assert cal.default_threshold == pytest.approx(2.33, abs=0.05)
    assert cal.peak_threshold(strict + 0.5) == pytest.approx(strict + 0.5)
    assert Calibration.from_healthy(values).peak_threshold(0.0) is None
    with pytest.raises(ValueError, match="peak false-positive rate"):
        Calibration.from_healthy(values, max_peak_fpr=0.05)  # looser than the 1% default
    old = asdict(Calibration.from_healthy(values))
    del old["max_peak_fpr"]  # a model file written before the rule existed
    assert Calibration(**old).max_peak_fpr is None


def test_component_statistics_match_scipy(rng):
    from scipy import ndimage

    from SpatialMSMALib.spatial import component_statistics

    labels, count = ndimage.label(rng.random((30, 20, 25)) > 0.7)
    values = rng.normal(size=labels.shape)
    ids = np.arange(1, count + 1)
    sizes, sums, peaks, centroids = component_statistics(labels, count, values)
    np.testing.assert_allclose(sizes, ndimage.sum_labels(np.ones(labels.shape), labels, ids))
    np.testing.assert_allclose(sums / sizes, ndimage.mean(values, labels, ids))
    np.testing.assert_allclose(peaks, ndimage.maximum(values, labels, ids))
    np.testing.assert_allclose(centroids,
                               ndimage.center_of_mass(np.ones(labels.shape), labels, ids))


def test_smoothing_does_not_leak_from_outside_the_region():
    region = np.zeros((16, 16, 16), bool)
    region[4:12, 4:12, 4:12] = True
    heat = np.where(region, 2.0, 100.0).astype(np.float32)
    smooth = smooth_in_region(heat, region, 1.5)
    np.testing.assert_allclose(smooth[region], 2.0, rtol=1e-5)
    assert np.isnan(smooth[~region]).all()


def test_scored_region_drops_the_brain_rim():
    from SpatialMSMALib.spatial import scored_region

    brain = np.zeros((20, 20, 20), bool)
    brain[2:18, 2:18, 2:18] = True
    assert scored_region(brain, 0.0, 2.0).sum() == 16**3
    assert scored_region(brain, 4.0, 2.0).sum() == 12**3  # 2 voxels of 2 mm off each face
    assert not scored_region(brain, 4.0, 2.0)[3, 10, 10]


def _location_sets(rng, n, shift=0.0):
    """Features whose log mean depends on the position along axis 0 (a flow without the
    position could not model them as sharply)."""
    shape = (12, 10, 8)
    region = np.ones(shape, bool)
    x = np.linspace(-1, 1, shape[0])[None, :, None, None]
    sets = []
    for _ in range(n):
        log_norm = 1.5 * x + shift + rng.normal(0, 0.2, (4, *shape))
        sets.append(LocationSet.from_arrays(np.exp(log_norm).astype(np.float32),
                                            rng.normal(size=(2, *shape)).astype(np.float32),
                                            region, 4))
    return sets


def test_flow_learns_position_dependent_features(rng, tmp_path):
    train, val = _location_sets(rng, 6), _location_sets(rng, 2)
    trainer = SpatialTrainer(_config(300), train, val, tmp_path)
    initial = trainer.validate()
    trainer.run(progress=False)
    final = trainer.validate()
    # true density of the log norms: 4 independent N(., 0.2^2) -> entropy 4 * -0.19 = -0.78
    assert final < initial - 2
    assert final < 0.5
    flow = trainer.flow.eval()
    s = val[0]
    positions = normalised_positions(s.index, s.shape)
    g = flow.global_context(s.lowres[None]).expand(len(s.index), -1)
    with torch.no_grad():
        healthy = -flow.log_prob(s.norms.float(), positions, g)
        # the same features shown at the mirrored position along axis 0 are atypical there
        mirrored = positions * torch.tensor([-1.0, 1, 1])
        moved = -flow.log_prob(s.norms.float(), mirrored, g)
    far = positions[:, 0].abs() > 0.5
    assert (moved[far] > healthy[far] + 5).float().mean() > 0.9


def test_intensity_features_let_the_flow_model_what_intensity_is_normal_where(rng, tmp_path):
    shape = (12, 10, 8)
    region = np.ones(shape, bool)
    x = np.linspace(-1, 1, shape[0])[None, :, None, None]

    def scan():
        local = np.exp(rng.normal(0, 0.2, (4, *shape))).astype(np.float32)
        image = (x + rng.normal(0, 0.1, (2, *shape))).astype(np.float32)  # mean depends on x
        return local, image

    config = _config(300)
    config.flow.update(intensity_features=True, global_features=0)
    sets = [LocationSet.from_arrays(*scan(), region, 4, intensity_features=True)
            for _ in range(6)]
    trainer = SpatialTrainer(config, sets[:5], sets[5:], tmp_path)
    assert trainer.flow.config.input_dim == 6 and sets[0].norms.shape == (region.sum(), 6)
    trainer.run(progress=False)
    flow = trainer.flow.eval()
    local, image = scan()
    # training and inference assemble the same per-location values
    assembled = flow.location_features(torch.from_numpy(local), image)[:, region].T
    torch.testing.assert_close(LocationSet.from_arrays(local, image, region, 4, True).norms.float(),
                               assembled, atol=2e-3, rtol=1e-3)
    # a brighter T2 in one cube (1.0 = 10 SD of the healthy intensity) is anomalous there
    # and only there; the score norms are unchanged, so a norm-only flow could not see it
    bright = image.copy()
    bright[1, 2:5, 2:5, 2:5] += 1.0
    inside = np.zeros(shape, bool)
    inside[2:5, 2:5, 2:5] = True
    before, after = flow.heat_map(local, image, region), flow.heat_map(local, bright, region)
    assert (after[inside] - before[inside]).min() > 5
    np.testing.assert_allclose(after[~inside], before[~inside], rtol=0, atol=1e-5)
    # and it is stored and restored with the model's flow config
    assert SpatialFlowConfig(**json.loads(json.dumps(asdict(flow.config)))).intensity_features


def test_intensity_only_flow_ignores_the_score_norms(rng):
    shape = (6, 5, 4)
    region = np.ones(shape, bool)
    local = np.exp(rng.normal(size=(4, *shape))).astype(np.float32)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    config = SpatialFlowConfig(num_features=4, flow_layers=1, hidden=8, position_frequencies=1,
                               global_features=0, intensity_features=True,
                               score_features=False)
    flow = SpatialFlow(config).eval()
    assert config.input_dim == 2
    s = LocationSet.from_arrays(local, image, region, 4, intensity_features=True,
                                score_features=False)
    torch.testing.assert_close(s.norms.float(), torch.from_numpy(image[:, region].T),
                               atol=2e-3, rtol=1e-3)
    flow.set_feature_statistics(s.norms.float())
    np.testing.assert_array_equal(flow.heat_map(local, image, region),
                                  flow.heat_map(local * 5, image, region))
    assert not np.allclose(flow.heat_map(local, image, region),
                           flow.heat_map(local, image + 1, region))
    with pytest.raises(ValueError, match="score_features and/or intensity_features"):
        SpatialFlow(SpatialFlowConfig(num_features=4, score_features=False))


def test_score_level_selection(rng):
    assert parse_levels("all", 4) == [0, 1, 2, 3]
    assert parse_levels("1-2", 4) == [1, 2]
    assert parse_levels(" 3,1,3 ", 4) == [1, 3]
    for bad in ("2-5", "-1", "x", "", "1-"):
        with pytest.raises(ValueError, match="score levels"):
            parse_levels(bad, 4)
    with pytest.raises(ValueError, match="each in 0..3"):
        SpatialFlowConfig(num_features=4, score_levels="4")
    shape = (6, 5, 4)
    region = np.ones(shape, bool)
    local = np.exp(rng.normal(size=(4, *shape))).astype(np.float32)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    config = SpatialFlowConfig(num_features=4, flow_layers=1, hidden=8, position_frequencies=1,
                               global_features=0, intensity_features=True, score_levels="0,2")
    flow = SpatialFlow(config).eval()
    assert config.level_indices() == [0, 2] and config.input_dim == 4
    s = LocationSet.from_arrays(local, image, region, 4, intensity_features=True,
                                score_levels=config.level_indices())
    expected = np.concatenate([local[[0, 2]][:, region], image[:, region]]).T
    torch.testing.assert_close(s.norms.float(), torch.from_numpy(expected), atol=5e-3, rtol=1e-3)
    flow.set_feature_statistics(s.norms.float())
    # the unselected levels 1 and 3 do not reach the heat map; a selected one does
    changed = local.copy()
    changed[[1, 3]] *= 5
    np.testing.assert_array_equal(flow.heat_map(local, image, region),
                                  flow.heat_map(changed, image, region))
    changed[2] *= 5
    assert not np.allclose(flow.heat_map(local, image, region),
                           flow.heat_map(changed, image, region))


def test_multiscale_intensities_stay_inside_the_brain(rng):
    shape = (12, 10, 8)
    support = np.zeros(shape, bool)
    support[2:10, 2:8, 2:6] = True
    image = np.full((2, *shape), -1.0, np.float32)  # background -1, as preprocessing writes
    image[0][support], image[1][support] = 0.5, -0.25
    out = multiscale_intensities(image, support, [0.0, 1.5])
    assert out.shape == (4, *shape) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:2], image)  # sigma 0: the values themselves
    # a constant brain stays constant up to its edge: the background never leaks in
    np.testing.assert_allclose(out[2][support], 0.5, atol=1e-5)
    np.testing.assert_allclose(out[3][support], -0.25, atol=1e-5)
    np.testing.assert_array_equal(out[2:][:, ~support], image[:, ~support])
    # a bright voxel raises its neighbourhood mean, less with distance, and not its own value
    image[0, 5, 5, 3] += 4.0
    out = multiscale_intensities(image, support, [0.0, 1.5])
    assert out[2, 5, 5, 3] > out[2, 6, 5, 3] > out[2, 8, 5, 3] > 0.5 + 1e-4
    assert out[0, 6, 5, 3] == 0.5


def test_multiscale_flow_sees_the_neighbourhood(rng):
    shape = (10, 9, 8)
    brain = np.zeros(shape, bool)
    brain[1:9, 1:8, 1:7] = True
    region = brain.copy()
    region[[1, 8]] = False  # the scored region is smaller than the brain (the rim)
    for bad in ("4,-2", "a", "4,4", ""):
        with pytest.raises(ValueError, match="intensity scales"):
            SpatialFlowConfig(intensity_features=True, intensity_scales_mm=bad)
    config = SpatialFlowConfig(num_features=4, flow_layers=1, hidden=8, position_frequencies=1,
                               global_features=0, intensity_features=True,
                               score_features=False, intensity_scales_mm="0,4",
                               grid_spacing_mm=2.0)
    assert config.intensity_sigmas_vox() == [0.0, 2.0] and config.input_dim == 4
    local = np.exp(rng.normal(size=(4, *shape))).astype(np.float32)
    image = np.where(brain, rng.normal(size=(2, *shape)), -1.0).astype(np.float32)
    flow = SpatialFlow(config).eval()
    s = LocationSet.from_arrays(local, image, brain, 4, intensity_features=True,
                                score_features=False,
                                intensity_sigmas_vox=config.intensity_sigmas_vox())
    expected = multiscale_intensities(image, brain, [0.0, 2.0])[:, brain].T
    torch.testing.assert_close(s.norms.float(), torch.from_numpy(expected), atol=5e-3, rtol=1e-3)
    flow.set_feature_statistics(s.norms.float())
    # detection smooths inside the brain mask like training, not inside the scored region
    assembled = flow.location_features(torch.from_numpy(local), image, brain)[:, brain].T
    torch.testing.assert_close(assembled.float(), torch.from_numpy(expected))
    heat = flow.heat_map(local, image, region, brain_mask=brain)
    assert not np.allclose(heat[region], flow.heat_map(local, image, region)[region])
    # a change at one voxel moves the heat map at its neighbours (their smoothed values);
    # a flow of the voxel's own intensities alone would only move it at that voxel
    changed = image.copy()
    changed[:, 4, 4, 3] += 3.0
    moved = np.abs(flow.heat_map(local, changed, region, brain_mask=brain) - heat)
    assert moved[5, 4, 3] > 1e-3 and moved[4, 6, 3] > 1e-3
    with pytest.raises(ValueError, match="brain mask"):
        flow.location_features(torch.from_numpy(local), image)


def test_white_matter_reference_removes_a_channel_offset_in_training_and_detection(rng):
    """``intensity_reference="template_wm"``: each channel minus its median in the template's
    white matter, the same in training (LocationSet) and detection (SpatialFlow), so a
    constant offset of a channel inside the brain leaves the features and the heat map
    unchanged; without the reference it moves them."""
    from SpatialMSMALib.template import template_on_grid

    spacing, shape = 8.0, (24, 28, 24)  # a coarse model grid: the same template, fast
    brain = template_on_grid(spacing, shape).brain_mask
    region = brain.copy()
    with pytest.raises(ValueError, match="none, template_wm"):
        SpatialFlowConfig(intensity_features=True, intensity_reference="wm")
    config = SpatialFlowConfig(num_features=4, flow_layers=1, hidden=8, position_frequencies=1,
                               global_features=0, intensity_features=True,
                               score_features=False, intensity_scales_mm="0,8",
                               grid_spacing_mm=spacing, intensity_reference="template_wm")
    reference = intensity_reference_mask(config, shape)
    assert intensity_reference_mask(SpatialFlowConfig(intensity_features=True), shape) is None
    assert reference.shape == shape and 100 < (reference & brain).sum() < 0.7 * brain.sum()
    assert (reference & ~brain).sum() < 0.05 * reference.sum()  # white matter is brain
    local = np.exp(rng.normal(size=(4, *shape))).astype(np.float32)
    image = np.where(brain, rng.normal(size=(2, *shape)), -1.0).astype(np.float32)
    shifted = np.where(brain, image + np.array([0.3, -0.2], np.float32)[:, None, None, None],
                       image).astype(np.float32)
    referenced = referenced_intensities(image, brain, reference)
    inside = brain & reference
    np.testing.assert_allclose([np.median(c[inside]) for c in referenced], 0.0, atol=1e-6)
    np.testing.assert_array_equal(referenced[:, ~brain], image[:, ~brain])
    np.testing.assert_allclose(referenced_intensities(shifted, brain, reference), referenced,
                               atol=1e-5)
    with pytest.raises(ValueError, match="only 0 brain voxels"):
        referenced_intensities(image, np.zeros(shape, bool), reference)
    sets = [LocationSet.from_arrays(local, im, brain, 4, intensity_features=True,
                                    score_features=False,
                                    intensity_sigmas_vox=config.intensity_sigmas_vox(),
                                    intensity_reference_mask=reference)
            for im in (image, shifted)]
    expected = multiscale_intensities(referenced, brain, [0.0, 1.0])[:, brain].T
    for s in sets:
        torch.testing.assert_close(s.norms.float(), torch.from_numpy(expected), atol=5e-3,
                                   rtol=1e-3)
    flow = SpatialFlow(config).eval()
    flow.set_feature_statistics(sets[0].norms.float())
    assembled = flow.location_features(torch.from_numpy(local), image, brain)[:, brain].T
    torch.testing.assert_close(assembled.float(), torch.from_numpy(expected), atol=1e-5,
                               rtol=1e-5)
    heat = flow.heat_map(local, image, region, brain_mask=brain)
    np.testing.assert_allclose(flow.heat_map(local, shifted, region, brain_mask=brain)[region],
                               heat[region], atol=1e-4)
    plain = SpatialFlow(SpatialFlowConfig(**{**asdict(config), "intensity_reference": "none"}))
    plain.load_state_dict(flow.state_dict())
    plain.eval()
    moved = plain.heat_map(local, shifted, region, brain_mask=brain)
    assert np.abs(moved[region] - plain.heat_map(local, image, region, brain_mask=brain)[region]
                  ).mean() > 1e-2


def test_position_grid_context_reads_the_right_node_and_learns(rng, tmp_path):
    grid = torch.zeros(1, 2, 5, 5, 5)
    grid[0, 0, 4, 0, 0], grid[0, 1, 0, 2, 4] = 1.0, 3.0  # axes x, y, z
    positions = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 0.0, 1.0], [0.75, -1.0, -1.0]])
    torch.testing.assert_close(grid_context(grid, positions),
                               torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.5, 0.0]]))
    config = _config(30)
    config.flow.update(position_grid_features=3, position_grid_nodes=4)
    trainer = SpatialTrainer(config, _location_sets(rng, 3), _location_sets(rng, 1), tmp_path)
    assert trainer.flow.config.context_dim == (3 + 6 * config.flow["position_frequencies"]
                                               + 3 + config.flow["global_features"])
    trainer.run(progress=False)
    assert trainer.flow.position_grid.abs().max() > 0  # the grid receives gradients
    for bad in ({"position_grid_features": -1}, {"position_grid_features": 2,
                                                 "position_grid_nodes": 1}):
        with pytest.raises(ValueError, match="position grid"):
            SpatialFlowConfig(**bad)


def test_trainer_resume_continues_the_same_run(rng, tmp_path):
    train, val = _location_sets(rng, 4), _location_sets(rng, 1)
    straight = SpatialTrainer(_config(100), train, val, tmp_path / "a")
    straight.run(progress=False)
    first = SpatialTrainer(_config(100), train, val, tmp_path / "b")
    first.run(progress=False, stop_after=50)  # "killed" after its checkpoint at step 50
    resumed = SpatialTrainer(_config(100), train, val, tmp_path / "b")
    resumed.resume(tmp_path / "b" / "last.pt")
    assert resumed.step == 50
    resumed.run(progress=False)
    for a, b in zip(straight.flow.state_dict().values(), resumed.flow.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="another configuration"):
        SpatialTrainer(_config(200), train, val, tmp_path / "c").resume(
            tmp_path / "b" / "last.pt")


def test_mixture_base_flow_has_a_normalised_density():
    torch.manual_seed(0)
    flow = SpatialFlow(SpatialFlowConfig(num_features=2, flow_layers=1, hidden=8,
                                         position_frequencies=1, global_features=0,
                                         mixture_components=3)).eval()
    # integrate the density over a 2D grid at a fixed position: must be ~1
    grid = torch.linspace(-8, 8, 321)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    log_norms = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    n = len(log_norms)
    with torch.no_grad():
        log_p = flow.flow.log_prob(log_norms, context=flow.context(torch.zeros(n, 3),
                                                                   torch.zeros(n, 0)))
    step = float(grid[1] - grid[0])
    assert float(log_p.exp().sum() * step**2) == pytest.approx(1.0, abs=0.02)


# -- model file, detection and the CLI ---------------------------------------------------
@pytest.mark.usefixtures("reuse_registrations")
def test_model_file_round_trip_with_flow_and_calibration(detection_setup):
    from SpatialMSMALib.model import AnomalyModel

    model = detection_setup["model"]
    loaded = AnomalyModel.load(detection_setup["path"])
    rng = np.random.default_rng(3)
    local = np.exp(rng.normal(size=(4, 8, 9, 10))).astype(np.float32)
    image = rng.normal(size=(2, 8, 9, 10)).astype(np.float32)
    region = rng.random((8, 9, 10)) > 0.3
    np.testing.assert_allclose(loaded.spatial.heat_map(local, image, region),
                               model.spatial.heat_map(local, image, region), rtol=1e-6)
    assert loaded.calibration.scores == model.calibration.scores
    assert loaded.calibration.min_component_ml == 0.2


def test_flow_ensemble_is_the_mean_of_its_members_and_survives_the_model_file(
        detection_setup, tmp_path):
    import copy

    from SpatialMSMALib.errors import InputError
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.spatial import FlowEnsemble

    model = copy.copy(detection_setup["model"])
    first = detection_setup["model"].spatial
    torch.manual_seed(5)
    second = SpatialFlow(first.config).eval()  # untrained: a heat map unlike the first's
    model.spatial = FlowEnsemble([first, second])
    rng = np.random.default_rng(4)
    local = np.exp(rng.normal(size=(4, 8, 9, 10))).astype(np.float32)
    image = rng.normal(size=(2, 8, 9, 10)).astype(np.float32)
    region = rng.random((8, 9, 10)) > 0.3
    a, b = (f.heat_map(local, image, region) for f in (first, second))
    assert np.abs(a - b)[region].min() > 1e-3  # the members really differ
    fractions = []
    mean = model.spatial.heat_map(local, image, region, progress=fractions.append)
    np.testing.assert_allclose(mean[region], ((a + b) / 2)[region], rtol=1e-5)
    assert np.isnan(mean[~region]).all()
    assert fractions[-1] == 1.0 and fractions == sorted(fractions) and min(fractions) <= 0.5
    loaded = AnomalyModel.load(model.save(tmp_path / "ensemble.pt"))
    assert isinstance(loaded.spatial, FlowEnsemble) and len(loaded.spatial) == 2
    np.testing.assert_allclose(loaded.spatial.heat_map(local, image, region)[region],
                               mean[region], rtol=1e-5)
    # a single flow keeps the old file layout (no member count)
    from SpatialMSMALib.checkpoint import load_checkpoint

    assert "spatial_members" not in load_checkpoint(detection_setup["path"])["config"]
    assert load_checkpoint(tmp_path / "ensemble.pt")["config"]["spatial_members"] == 2
    with pytest.raises(ValueError, match="one configuration"):
        FlowEnsemble([first, SpatialFlow(SpatialFlowConfig(num_features=4, hidden=8))])
    with pytest.raises(ValueError, match="at least two"):
        FlowEnsemble([first])
    # a file whose member count does not match its weights is refused, naming the file
    from SpatialMSMALib.checkpoint import save_checkpoint

    checkpoint = load_checkpoint(tmp_path / "ensemble.pt")
    checkpoint["config"]["spatial_members"] = 3
    save_checkpoint(tmp_path / "bad.pt", checkpoint["kind"], checkpoint["config"],
                    checkpoint["states"], checkpoint["extra"])
    with pytest.raises(InputError, match="bad.pt"):
        AnomalyModel.load(tmp_path / "bad.pt")


@pytest.mark.usefixtures("reuse_registrations")
def test_detect_cli_finds_the_lesion_and_writes_every_output(detection_setup, capsys):
    from SpatialMSMALib.cli import main
    from SpatialMSMALib.io import load_volume

    paths, out = detection_setup["paths"], detection_setup["folder"] / "out"
    args = ["detect", "--t1", str(paths["t1"]), "--t2", str(paths["t2"]), "--model",
            str(detection_setup["path"]), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    labels = load_volume(out / "labels.nii.gz", allow_empty=True)
    heat = load_volume(out / "heatmap.nii.gz")
    t1 = load_volume(paths["t1"])
    assert labels.shape == t1.shape and np.allclose(labels.affine, t1.affine)
    assert (out / "figure.png").stat().st_size > 10_000
    assert report["n_components"] == int(labels.data.max()) >= 1
    top = report["components"][0]
    # the strongest component is the simulated lesion (12 mm radius): centroid inside it,
    # covering a good part of it (an untrained 4/8-channel score net sees intensity only)
    lesion = load_volume(paths["lesion"]).data > 0
    lesion_centre = labels.affine[:3, :3] @ np.argwhere(lesion).mean(0) + labels.affine[:3, 3]
    # (the component spills past the lesion's medial edge: ~12 mm, varying with threading)
    assert np.linalg.norm(np.asarray(top["centroid_ras_mm"]) - lesion_centre) < 16
    assert (labels.data[lesion] == 1).mean() > 0.3
    # the component statistics agree with the volumes written
    voxel_ml = 8 / 1000
    assert top["volume_ml"] == pytest.approx((labels.data == 1).sum() * voxel_ml, rel=1e-6)
    assert top["peak_score"] == pytest.approx(float(heat.data[labels.data == 1].max()), rel=1e-5)
    assert report["voxel_false_positive_rate"] == pytest.approx(0.01)
    assert report["typicality"]["scores"]["knn"]["percentile"] >= 0
    # no --mask: the report and the command's output say what that costs
    from SpatialMSMALib.detection import NO_BRAIN_MASK_WARNING

    assert report["warnings"][-1] == NO_BRAIN_MASK_WARNING
    assert "warning: no brain mask was given" in capsys.readouterr().out
    # its registration passed the quality gate, so the report records no retry
    assert "registration_retry" in report and report["registration_retry"] is None
    # outputs are never overwritten silently (refused before any computation)
    capsys.readouterr()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a stricter operating point flags less
    assert main(args + ["--overwrite", "--fpr", "0.0001"]) == 0
    strict = json.loads((out / "report.json").read_text())
    assert strict["flagged_volume_ml"] < report["flagged_volume_ml"]
    assert strict["threshold"] > report["threshold"]
    # moving the threshold afterwards (the GUI sliders) gives what a fresh run gives
    from SpatialMSMALib.detection import Detection, relabel

    model = detection_setup["model"]
    # relabel the heat map the strict run wrote, at the default labels: two runs' heat maps
    # can differ in the last float bit (threaded reductions), which flips a voxel lying
    # exactly at the threshold, so the comparison uses one run's map
    strict_heat = load_volume(out / "heatmap.nii.gz")
    # outside the brain the heat map holds the calibration floor, below any threshold
    everywhere = np.ones(heat.shape, bool)
    stored = Detection(strict_heat.data.astype(np.float32), everywhere, labels.data,
                       strict_heat.affine, 0.0, 0.0, float(model.calibration.scores[-1]), [],
                       None, None, None)
    moved = relabel(stored, model, fpr=0.0001)
    strict_labels = load_volume(out / "labels.nii.gz", allow_empty=True).data
    np.testing.assert_array_equal(moved.labels, strict_labels)
    assert len(moved.components) == strict["n_components"]


@pytest.mark.usefixtures("reuse_registrations")
def test_a_deformable_model_file_repeats_its_step_at_detection(
        detection_setup, tmp_path):
    """The demons step recorded in the model file is repeated at detection, and the heat map
    (computed in template space) comes back on the native grid."""
    from dataclasses import replace

    from SpatialMSMALib.detection import detect
    from SpatialMSMALib.errors import InputError
    from SpatialMSMALib.io import load_volume
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.preprocessing import PREPROCESS_VERSION, DemonsConfig

    # fitted on scans of preprocessing version 1, too: detection must repeat that version
    path = replace(detection_setup["model"], demons=DemonsConfig(iterations=20),
                   preprocess_version=1).save(tmp_path / "deformable.pt")
    model = AnomalyModel.load(path)
    assert model.demons == DemonsConfig(iterations=20)
    assert model.preprocess_version == 1 and model.preprocess_config().version == 1
    current = AnomalyModel.load(detection_setup["path"])
    assert current.demons is None and current.preprocess_version == PREPROCESS_VERSION
    # feature caches are named by network, demons step, preprocessing and feature version
    from SpatialMSMALib.score.features import FEATURE_VERSION

    assert (model.feature_cache_name("0" * 12)
            == f"features_000000000000_demons20x2_f{FEATURE_VERSION}")
    assert (current.feature_cache_name("0" * 12)
            == f"features_000000000000_p{PREPROCESS_VERSION}_f{FEATURE_VERSION}")
    # a model from a newer library is refused at load, naming the file
    newer = replace(detection_setup["model"], preprocess_version=PREPROCESS_VERSION + 1).save(
        tmp_path / "newer.pt")
    with pytest.raises(InputError, match="newer.pt.*upgrade"):
        AnomalyModel.load(newer)
    broken = replace(detection_setup["model"], preprocess_version=0).save(tmp_path / "bad.pt")
    with pytest.raises(InputError, match="bad.pt: invalid preprocessing version 0"):
        AnomalyModel.load(broken)
    paths = detection_setup["paths"]
    t1, t2 = load_volume(paths["t1"]), load_volume(paths["t2"])
    result = detect(model, t1, t2, device="cpu")
    step = [s for s in result.mapping.steps if s["step"] == "deformable registration"]
    assert len(step) == 1 and step[0]["iterations"] == 20
    assert result.heat.shape == t1.shape
    # where the heat lands natively is asserted by the mapping tests in test_preprocessing.py:
    # this session fixture's flow was trained on affine-space scans, so its components on a
    # template-space scan are not a reliable check of placement
    assert result.mapping.deformable and np.isfinite(result.heat).all()
    assert result.mapping.preprocess_version == 1


def test_detect_without_t2_says_the_model_needs_it(detection_setup, capsys):
    from SpatialMSMALib.cli import main

    paths = detection_setup["paths"]
    code = main(["detect", "--t1", str(paths["t1"]), "--model", str(detection_setup["path"]),
                 "--out", str(detection_setup["folder"] / "t1only")])
    assert code == 2
    err = capsys.readouterr().err
    assert "T1 + T2" in err and "les_t1.nii.gz" in err


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    data = np.random.default_rng(0)  # same cohort on both ranks; each draws its own batches
    train, val = _location_sets(data, 4), _location_sets(data, 1)
    trainer = SpatialTrainer(_config(5), train, val, out_dir, rank=rank, distributed=True)
    trainer.run(progress=False)
    torch.save(trainer.flow.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_train_the_flow_to_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    initial = SpatialFlow(SpatialFlowConfig(**_config(5).flow)).state_dict()
    changed = False
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
        changed |= not torch.equal(rank0[key], initial[key])
    assert changed


def test_detect_names_a_missing_input_file(tmp_path, capsys):
    from SpatialMSMALib.cli import main

    code = main(["detect", "--t1", str(tmp_path / "absent_t1.nii.gz"), "--out",
                 str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "T1 file" in err and "absent_t1.nii.gz" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("reuse_registrations")
def test_detect_list_writes_each_scan_to_its_folder_and_shards_by_rank(
        detection_setup, tmp_path, monkeypatch, capsys):
    """``detect --list``: paths relative to the CSV's folder, outputs in OUT/<id>/, and under
    torchrun each rank takes every WORLD_SIZE-th row (RANK 1 of 2: the second row only; the
    row split itself is tested in test_cli_bad_input.py)."""
    from SpatialMSMALib.cli import main
    from SpatialMSMALib.io import load_volume

    paths = detection_setup["paths"]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("t1", "t2"):
        (cohort / f"s_{name}.nii.gz").symlink_to(paths[name])
    scans = cohort / "scans.csv"
    scans.write_text("id,t1,t2\n"
                     f"first,{paths['t1']},{paths['t2']}\n"  # absolute paths
                     "second,s_t1.nii.gz,s_t2.nii.gz\n")  # relative to the CSV
    out = tmp_path / "out"
    args = ["detect", "--list", str(scans), "--model", str(detection_setup["path"]),
            "--out", str(out), "--device", "cpu"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) == 0
    assert not (out / "first").exists() and not (out / "report.json").exists()
    report = json.loads((out / "second" / "report.json").read_text())
    labels = load_volume(out / "second" / "labels.nii.gz", allow_empty=True)
    assert labels.shape == load_volume(paths["t1"]).shape
    assert report["n_components"] == int(labels.data.max()) >= 1
    assert report["inputs"]["t1"].endswith("s_t1.nii.gz")
    # a rank's rerun refuses to overwrite its scans' outputs, before computing anything
    capsys.readouterr()
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
