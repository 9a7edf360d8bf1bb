"""The normative blob-contrast model and its fusion with the flow's heat map."""

import json

import numpy as np
import pytest

from SpatialMSMALib.normative import (
    NormativeContrast,
    NormativeContrastConfig,
    blob_contrasts,
    evidence,
    fused_heat,
)
from SpatialMSMALib.spatial import Calibration

SHAPE = (26, 26, 26)


def _ball(radius, centre=(13, 13, 13)):
    ijk = np.indices(SHAPE)
    return ((ijk - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2


def _healthy_scan(rng, anatomy, support):
    """The same two-channel anatomy with a per-scan offset, a linear bias and noise."""
    ijk = np.indices(SHAPE).astype(np.float32)
    offset = rng.uniform(-0.5, 0.5, (2, 1, 1, 1))
    slope = rng.uniform(-0.02, 0.02, (2, 3))
    bias = np.einsum("ca,axyz->cxyz", slope, ijk - 13)
    image = anatomy + offset + bias + rng.normal(0, 0.02, anatomy.shape)
    return np.where(support, image, 0).astype(np.float32)


@pytest.fixture
def healthy_cohort(rng):
    from scipy.ndimage import gaussian_filter

    support = _ball(11)
    anatomy = np.stack([gaussian_filter(rng.normal(size=SHAPE), 3) * 3 for _ in range(2)])
    scans = [_healthy_scan(rng, anatomy, support) for _ in range(30)]
    return anatomy, support, scans


def test_blob_contrasts_ignore_offsets_and_linear_trends_and_see_a_blob():
    support = _ball(11)
    ijk = np.indices(SHAPE).astype(np.float32)
    trend = (3.0 + 0.05 * ijk[0] - 0.03 * ijk[2])[None]
    interior = _ball(4)
    contrast = blob_contrasts(trend, support, [1.0], 2.5)
    assert contrast.shape == (1, 1, *SHAPE)
    # a Gaussian keeps a linear function: almost no contrast in the interior (the surround's
    # tails reach past the support, where the normalised convolution bends it a little)
    assert np.abs(contrast[0, 0][interior]).max() < 0.005
    blob = trend + 0.5 * _ball(2)[None]
    at_blob = blob_contrasts(blob, support, [1.0], 2.5)[0, 0]
    assert at_blob[13, 13, 13] > 0.2  # most of the 0.5 step, the surround mostly outside
    assert at_blob[13, 13, 20] < 0.01  # 7 voxels away: the blob is beyond the surround
    assert np.all(contrast[:, :, ~support] == 0)


def test_normative_model_flags_a_small_blob_not_a_new_offset_or_trend(rng, healthy_cohort):
    anatomy, support, scans = healthy_cohort
    model = NormativeContrast.fit(((s, support) for s in scans[:25]),
                                  NormativeContrastConfig(sigmas_vox=(1.0,)))
    assert model.valid.sum() == support.sum()  # every scan has the same support
    interior = _ball(6)
    healthy = [model.squared_distance(s, support)[interior] for s in scans[25:]]
    # an offset outside the training range and a steeper trend: still typical contrasts
    shifted = scans[25] + np.where(support, 2.0 + 0.04 * np.indices(SHAPE)[0], 0)
    shifted_distance = model.squared_distance(shifted.astype(np.float32), support)
    assert np.percentile(shifted_distance[interior], 99) < 3 * np.percentile(healthy, 99)
    # a 5-voxel-diameter blob, +0.12 on channel 1 (6 noise SDs, a fifth of the offsets' range)
    lesioned = scans[26].copy()
    lesioned[1] += 0.12 * _ball(2)
    distance = model.squared_distance(lesioned, support)
    assert distance[13, 13, 13] > 10 * np.percentile(healthy, 99)
    assert np.all(distance[~support] == 0)


def test_normative_model_state_round_trip_and_shape_checks(healthy_cohort):
    _, support, scans = healthy_cohort
    model = NormativeContrast.fit((s, support) for s in scans[:10])
    config, states = model.to_state()
    json.dumps(config)  # plain data for the checkpoint's config
    again = NormativeContrast.from_state(config, states)
    np.testing.assert_array_equal(again.squared_distance(scans[12], support),
                                  model.squared_distance(scans[12], support))
    with pytest.raises(ValueError, match="differs"):
        model.squared_distance(scans[12][:, :-1], support[:-1])
    with pytest.raises(ValueError, match="too few"):
        NormativeContrast.fit((s, support) for s in scans[:2])
    with pytest.raises(ValueError, match="surround_ratio"):
        NormativeContrastConfig(surround_ratio=1.0)


def test_fused_heat_adds_the_two_maps_healthy_evidence(rng):
    values = rng.random(200_000)
    flow = Calibration.from_healthy([values])
    normative = Calibration.from_healthy([values * 10])
    at_1_percent = np.quantile(values, 0.99)
    np.testing.assert_allclose(evidence(np.array([at_1_percent]), flow), [2.0], atol=0.02)
    heat = fused_heat(np.array([at_1_percent, np.nan, at_1_percent]),
                      np.array([10 * np.quantile(values, 0.9), 5.0, np.nan]), flow, normative)
    # 1% and 10%: 2 + 1; NaN where the flow's map is undefined; a NaN normative value adds 0
    np.testing.assert_allclose(heat[0], 3.0, atol=0.03)
    assert np.isnan(heat[1])
    np.testing.assert_allclose(heat[2], 2.0, atol=0.02)
    assert evidence(np.array([1e9]), flow)[0] == pytest.approx(6.0)  # capped at 1e-6


@pytest.mark.usefixtures("reuse_registrations")
def test_a_model_with_the_normative_map_saves_loads_and_detects_the_lesion(
        detection_setup, tmp_path):
    from SpatialMSMALib.detection import component_heat_maps, detect, model_heat_map
    from SpatialMSMALib.io import load_volume
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.spatial import scored_region

    model = AnomalyModel.load(detection_setup["path"])
    assert model.heat_units == "nats"  # the flow's NLL alone
    base = detection_setup["base"]
    brain = base.brain_mask
    rng = np.random.default_rng(5)
    from scipy.ndimage import shift

    # healthy variation: noise and sub-voxel misalignment (what registration leaves)
    noisy = [(shift(base.image, (0, *rng.uniform(-0.6, 0.6, 3)), order=1)
              + rng.normal(0, 0.03, base.image.shape) * brain).astype(np.float32)
             for _ in range(10)]
    model.normative = NormativeContrast.fit((image, brain) for image in noisy[:8])
    with pytest.raises(ValueError, match="calibrations"):
        model.save(tmp_path / "incomplete.pt")
    no_norms = np.zeros((4, *brain.shape), np.float32)
    region = scored_region(brain, model.calibration.rim_mm, model.spacing_mm)
    maps = [component_heat_maps(model, image, brain, no_norms) for image in noisy[8:]]
    model.component_calibrations = {
        name: Calibration.from_healthy([m[k][region] for m in maps])
        for k, name in enumerate(("flow", "normative"))}
    fused = [model_heat_map(model, image, brain, no_norms) for image in noisy[8:]]
    model.calibration = Calibration.from_healthy([h[region] for h in fused],
                                                 min_component_ml=0.2)
    path = model.save(tmp_path / "fused.pt")
    loaded = AnomalyModel.load(path)
    np.testing.assert_allclose(model_heat_map(loaded, noisy[9], brain, no_norms),
                               fused[1], rtol=1e-5, equal_nan=True)
    paths = detection_setup["paths"]
    detection = detect(loaded, load_volume(paths["t1"]), load_volume(paths["t2"]))
    assert detection.report(loaded)["heat_units"] == "-log10 FPR"
    lesion = load_volume(paths["lesion"]).data > 0
    assert (detection.labels[lesion] > 0).mean() > 0.5
    from scipy.ndimage import distance_transform_edt

    flagged = detection.labels > 0
    mm_from_lesion = distance_transform_edt(~lesion, sampling=load_volume(paths["t1"]).spacing)
    # away from the lesion no more than the healthy rate; most flagged voxels at the lesion
    # or its rim (a strong 7 mL lesion lowers its surround's contrast: a halo of a few mm)
    assert flagged[detection.brain_mask & (mm_from_lesion > 20)].mean() < 0.01
    assert (mm_from_lesion[flagged] <= 20).mean() > 0.8
    assert detection.report(loaded)["scan_standardization"] is None
    # with the normative map standardised per scan (ratio to its median): saved and loaded
    # with the model, applied before the fusion, and each scan's factors in the report
    from SpatialMSMALib.scan_standardization import ScanStandardization, scan_statistics

    rule = ScanStandardization.fit("ratio", [m[1] for m in maps], [region, region])
    loaded.scan_standardization = {"normative": rule}
    standardised = AnomalyModel.load(loaded.save(tmp_path / "standardised.pt"))
    assert standardised.scan_standardization["normative"] == rule
    factors = {}
    flow_map, normative_map = component_heat_maps(standardised, 2 * noisy[9], brain, no_norms,
                                                  scan_factors=factors)
    assert scan_statistics(normative_map, region)["median"] == pytest.approx(
        rule.reference_median, rel=1e-5)
    raw_normative = component_heat_maps(model, 2 * noisy[9], brain, no_norms)[1]
    np.testing.assert_allclose(normative_map, raw_normative * factors["normative"]["scale"],
                               rtol=1e-5, equal_nan=True)
    assert set(factors) == {"normative"}
    report = detect(standardised, load_volume(paths["t1"]),
                    load_volume(paths["t2"])).report(standardised)
    entry = report["scan_standardization"]["normative"]
    assert entry["scale"] > 0 and entry["offset"] == 0.0
    assert entry["scale"] == pytest.approx(rule.reference_median / entry["median"])
