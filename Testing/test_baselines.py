"""Baseline anomaly maps (SpatialMSMALib.baselines) and the side-by-side benchmark harness."""


import numpy as np
import pytest
import torch

from SpatialMSMALib.baselines import (
    AutoencoderConfig,
    LocationGMM,
    RestorationConfig,
    VoxelZScore,
    log_features,
    reconstruction_residual,
    restoration_residual,
    train_autoencoder,
)

SHAPE = (20, 22, 18)


def _brain():
    ijk = np.indices(SHAPE)
    centre = (np.array(SHAPE) - 1) / 2
    return (((ijk - centre[:, None, None, None]) / np.array([8, 9, 7])[:, None, None, None])
            ** 2).sum(0) <= 1


def test_voxel_zscore_statistics_floor_and_lesion(rng):
    brain = _brain()
    pattern = np.stack([np.sin(np.indices(SHAPE).sum(0) / 4.0), np.cos(np.indices(SHAPE)[0] / 3)])
    scans = [(np.where(brain, pattern + rng.normal(0, 0.1, pattern.shape), -1.0), brain)
             for _ in range(12)]
    z = VoxelZScore.fit(iter(scans))
    stacked = np.stack([s for s, _ in scans])
    np.testing.assert_allclose(z.mean, stacked.mean(0), atol=1e-5)
    inside = np.broadcast_to(brain, z.sd.shape)
    np.testing.assert_allclose(z.sd[inside], np.maximum(stacked.std(0, ddof=1), z.sd[inside].min())
                               [inside], rtol=1e-4)
    # background is constant (SD 0): floored at a quarter of the median in-brain SD, not 0
    floor = 0.25 * np.median(stacked.std(0, ddof=1)[:, brain], axis=1)
    np.testing.assert_allclose(z.sd[:, 0, 0, 0], floor, rtol=1e-4)
    test = np.where(brain, pattern + rng.normal(0, 0.1, pattern.shape), -1.0)
    test[:, 8:11, 9:12, 7:10] += np.array([-0.8, 0.8])[:, None, None, None]
    score = z.score(test)
    assert np.isfinite(score).all()
    assert score[8:11, 9:12, 7:10].mean() > 5  # 0.8 / 0.1 in both channels
    assert np.median(score[brain]) < 1.5


def test_location_gmm_ranks_unusual_feature_vectors_higher(rng):
    healthy = np.exp(rng.normal(0, 0.3, size=(4000, 5)) + np.arange(5))
    gmm = LocationGMM.fit(np.log(healthy), components=2, seed=0)
    region = np.zeros((10, 12, 8), bool)
    region[2:8, 3:9, 2:6] = True
    local = np.exp(rng.normal(0, 0.3, size=(5, *region.shape)) + np.arange(5)[:, None, None, None])
    local[:, 4, 5, 3] *= np.exp(2.0)  # every level 2 nats (~7 SD) above normal
    nll = gmm.score(local.astype(np.float32), region)
    assert np.isnan(nll[~region]).all() and np.isfinite(nll[region]).all()
    others = nll[region & ~(np.indices(region.shape) == np.array([4, 5, 3])[:, None, None, None])
                 .all(0)]
    assert nll[4, 5, 3] > others.max()
    # log_features pairs locations with the region in C order
    np.testing.assert_allclose(log_features(local, region)[0],
                               np.log(local[:, 2, 3, 2] + 1e-6), rtol=1e-5)


def test_autoencoder_learns_and_residual_is_the_reconstruction_error(rng):
    brain = _brain()
    images = [np.where(brain, np.sin(np.indices(SHAPE)[0] / 3.0) + rng.normal(0, 0.05, SHAPE),
                       -1.0)[None].repeat(2, 0).astype(np.float32) for _ in range(4)]
    config = AutoencoderConfig(channels=(4, 8), strides=(2, 2), crop=16, batch_size=2,
                               steps=60, learning_rate=3e-3)
    net, losses = train_autoencoder(images, [brain] * 4, config)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    residual = reconstruction_residual(net, images[0], brain, multiple=4)
    assert residual.shape == SHAPE and (residual >= 0).all()
    from SpatialMSMALib.score.features import crop_around

    box = crop_around(brain, margin=4, multiple=4)
    with torch.no_grad():
        x = torch.from_numpy(images[0][(slice(None),) + box])[None]
        pad = [(-s) % 4 for s in x.shape[2:]]
        assert any(pad)  # the 18-voxel axis cannot grow to a multiple of 4: padded
        padded = torch.nn.functional.pad(x, [p for n in reversed(pad) for p in (0, n)],
                                         mode="replicate")
        out = net(padded)[..., : x.shape[2], : x.shape[3], : x.shape[4]]
        expected = (x - out).pow(2).sum(1).sqrt()[0].numpy()
    np.testing.assert_allclose(residual[box], expected, rtol=1e-4, atol=1e-5)
    outside = np.ones(SHAPE, bool)
    outside[box] = False
    assert (residual[outside] == 0).all()


class GaussianScore(torch.nn.Module):
    """The exact score of per-voxel N(0, tau^2) data noised with sigma."""

    tau = 0.1

    def forward(self, x, sigma):
        return -x / (self.tau**2 + sigma.view(-1, 1, 1, 1, 1) ** 2)


def test_restoration_removes_what_the_prior_does_not_expect(rng):
    brain = _brain()
    image = np.where(brain, rng.normal(0, 0.1, (2, *SHAPE)), 0).astype(np.float32)
    image[:, 8:12, 9:13, 7:10] += 1.0  # 10 SD away from the healthy prior
    residual = restoration_residual(GaussianScore(), image, brain, RestorationConfig(draws=3))
    lesion = np.zeros(SHAPE, bool)
    lesion[8:12, 9:13, 7:10] = True
    # each Tweedie step shrinks towards 0 by tau^2 / (tau^2 + sigma^2): the offset of 1 (x2
    # channels) is removed, so the residual there is about sqrt(2)
    assert residual[lesion].mean() > 1.2
    assert np.median(residual[brain & ~lesion]) < 0.25


def _load_harness():
    from conftest import load_benchmark_script

    return load_benchmark_script("baselines")


def _flagged_val_fraction(maps_dir, cache, threshold, model) -> float:
    """Fraction of the two healthy val scans' scored voxels whose cached map (in
    ``maps_dir``) reaches ``threshold``; brain masks from the model-space ``cache``."""
    from SpatialMSMALib.spatial import scored_region

    flagged, total = 0, 0
    for val_id in ("val_000", "val_001"):
        heat = np.load(maps_dir / f"{val_id}.npz")["heat"].astype(np.float32)
        brain = np.load(next(cache.glob(f"{val_id}_*mm.npz")))["brain_mask"] > 0
        region = scored_region(brain, model.calibration.rim_mm, model.spacing_mm)
        flagged += int((heat[region] >= threshold).sum())
        total += int(region.sum())
    return flagged / total


@pytest.mark.slow
def test_harness_runs_every_method_with_label_free_thresholds(detection_setup, tmp_path):
    """A tiny cohort end to end: every method is trained, calibrated on the healthy val scans
    only (1 % of their scored voxels flagged), evaluated and timed in its own process (about
    6 minutes on 2 cores, the default run's slowest test, so marked slow)."""
    from SpatialMSMALib.cohort import CohortSizes, make_benchmark

    manifest = make_benchmark(tmp_path / "cohort", seed=3, progress=False, sizes=CohortSizes(
        n_train=2, n_val=2, n_test_healthy=1, n_test_lesioned=1, n_loao_healthy=0,
        n_loao_lesioned=0))
    harness = _load_harness()
    size = harness.Size(autoencoder_steps=5, gmm_locations_per_scan=2000, cost_scans=1)
    results = harness.main(["--manifest", str(manifest), "--model", str(detection_setup["path"]),
                            "--work", str(tmp_path / "work"), "--splits", "test",
                            "--skip-reference", "--markdown", str(tmp_path / "table.md")], size)
    assert list(results["methods"]) == list(harness.METHODS)
    model = detection_setup["model"]
    assert results["methods"]["spatial-msma"]["threshold"] == pytest.approx(
        model.calibration.default_threshold)
    # the baselines' thresholds flag 1 % of the healthy validation voxels (their own maps)
    for name in ("voxel-zscore", "msma-gmm", "restoration"):
        entry = results["methods"][name]
        maps = sorted((tmp_path / "work" / "maps").glob(f"{name}_*"))
        assert len(maps) == 1
        cache = tmp_path / "work" / "cache"
        assert _flagged_val_fraction(maps[0], cache, entry["threshold"], model) == (
            pytest.approx(0.01, abs=0.002))
        summary = entry["splits"]["test"]["summary"]
        assert summary["n_lesioned"] == 1 and summary["n_healthy"] == 1
        cost = entry["cost"]
        assert "error" not in cost, cost
        assert cost["seconds_per_volume"] > 0 and 0.1 < cost["peak_rss_gb"] < 8
    table = (tmp_path / "table.md").read_text()
    for name in harness.METHODS:
        assert f"| {name} |" in table

    # a model with its own default rate and component growth (rate x3): the z-score is
    # calibrated at that rate with the same growth rule, and as no selected map reads score
    # norms, none are computed (a copy of the model-space cache without the feature folder)
    import dataclasses
    import shutil

    grown = dataclasses.replace(model, calibration=dataclasses.replace(
        model.calibration, default_fpr=0.02, grow_rate_factor=3.0))
    model_path = grown.save(tmp_path / "grown.pt")
    bare = tmp_path / "bare_cache"
    shutil.copytree(cache, bare, ignore=shutil.ignore_patterns("features_*"))
    again = harness.main(["--manifest", str(manifest), "--model", str(model_path),
                          "--work", str(tmp_path / "work2"), "--cache", str(bare),
                          "--splits", "test", "--methods", "voxel-zscore", "--skip-cost"])
    entry = again["methods"]["voxel-zscore"]
    assert entry["voxel_fpr"] == 0.02
    assert entry["post_processing"]["grow_rate_factor"] == 3.0
    assert entry["post_processing"]["min_component_ml"] == model.calibration.min_component_ml
    assert not list(bare.glob("features_*"))
    maps = sorted((tmp_path / "work2" / "maps").glob("voxel-zscore_*"))
    assert _flagged_val_fraction(maps[0], bare, entry["threshold"], model) == (
        pytest.approx(0.02, abs=0.004))


def test_fitted_methods_round_trip_through_a_weights_only_file(rng, tmp_path):
    """The cost probes get each method through ``Fitted.save`` / ``load`` (no pickle): the
    loaded method must score exactly like the fitted one."""
    from SpatialMSMALib.baseline_harness import Fitted, load_ae
    from SpatialMSMALib.baselines import build_autoencoder

    brain = _brain()
    scans = [(rng.normal(size=(2, *SHAPE)).astype(np.float32), brain) for _ in range(3)]
    gmm = LocationGMM.fit(rng.normal(size=(3000, 4)), components=3, seed=1)
    config = AutoencoderConfig(channels=(4, 8), strides=(2, 2))
    ae = build_autoencoder(config, 2).eval()
    fitted = Fitted("all", zscore=VoxelZScore.fit(iter(scans)), gmm=gmm,
                    autoencoder={"config": config.to_dict(), "in_channels": 2,
                                 "state": ae.state_dict()},
                    restoration=RestorationConfig(start_sigma=0.3, steps=4))
    loaded = Fitted.load(fitted.save(tmp_path / "fitted.pt"))
    image = scans[0][0]
    np.testing.assert_array_equal(loaded.zscore.score(image), fitted.zscore.score(image))
    local = np.exp(rng.normal(size=(4, *SHAPE))).astype(np.float32)
    np.testing.assert_allclose(loaded.gmm.score(local, brain), gmm.score(local, brain),
                               rtol=1e-6)
    np.testing.assert_array_equal(reconstruction_residual(load_ae(loaded, "cpu"), image, brain,
                                                          multiple=4),
                                  reconstruction_residual(ae, image, brain, multiple=4))
    assert loaded.restoration == fitted.restoration


def test_harness_refuses_bad_inputs_before_any_work(tmp_path):
    harness = _load_harness()
    with pytest.raises(SystemExit, match="no benchmark cohort at"):
        harness.main(["--manifest", str(tmp_path / "missing.json")])
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    out = tmp_path / "results.json"
    out.write_text("earlier results")
    with pytest.raises(SystemExit, match="already exist.*--overwrite"):
        harness.main(["--manifest", str(manifest), "--out", str(out)])
    assert out.read_text() == "earlier results"
    with pytest.raises(SystemExit, match=r"error: .*nothing\.pt"):
        harness.main(["--manifest", str(manifest), "--model", str(tmp_path / "nothing.pt")])

