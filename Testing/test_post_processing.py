"""The hysteresis rule of the post-processing (``Calibration.max_peak_fpr``): relabelling
with it, and changing it in a model file without retraining (training/set_post_processing.py)."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))


def _two_blob_detection(model):
    """A native-grid detection whose heat map holds two 5x5x5 blobs (2 mm voxels, 1 mL each)
    at the model's 1% threshold: one with a single voxel at its 0.01% threshold, one without
    any voxel above its 0.5% threshold."""
    from SpatialMSMALib.detection import Detection

    cal = model.calibration
    heat = np.full((30, 30, 30), cal.scores[-1], np.float32)
    heat[3:8, 3:8, 3:8] = cal.threshold_for_fpr(0.008)  # weak: peak FPR 0.8%
    heat[15:20, 15:20, 15:20] = cal.threshold_for_fpr(0.008)
    heat[17, 17, 17] = cal.threshold_for_fpr(1e-4)  # strong peak
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.ones(heat.shape, bool)
    return Detection(heat, brain, np.zeros(heat.shape, np.int16), affine, 0.0, 0.0,
                     float(cal.scores[-1]), [], None, None, None)


def test_relabel_reports_only_components_with_a_strong_peak(detection_setup):
    from set_post_processing import with_post_processing

    from SpatialMSMALib.detection import relabel

    model = detection_setup["model"]
    detection = _two_blob_detection(model)
    plain = relabel(detection, model, fpr=0.01)
    assert len(plain.components) == 2
    ruled = with_post_processing(model, max_peak_fpr=1e-3)
    kept = relabel(detection, ruled, fpr=0.01)
    assert len(kept.components) == 1
    assert kept.components[0].peak_voxel_fpr <= 1e-3
    assert kept.components[0].volume_ml == pytest.approx(125 * 8 / 1000)  # whole extent
    assert kept.labels[4, 4, 4] == 0 and kept.labels[16, 16, 16] == 1
    # a stricter operating point than the rule: the rule adds nothing
    assert len(relabel(detection, ruled, fpr=0.009).components) == 1
    assert len(relabel(detection, ruled, fpr=5e-5).components) == 0
    # the report states the rule
    assert kept.report(ruled)["model"]["post_processing"]["max_peak_fpr"] == 1e-3


def test_growth_sets_a_reported_component_s_extent_from_the_laxer_rate(detection_setup):
    from set_post_processing import with_post_processing

    from SpatialMSMALib.detection import relabel

    model = detection_setup["model"]
    cal = model.calibration
    heat = np.full((30, 30, 30), cal.scores[-1], np.float32)
    # a lesion-like blob: a 3x3x3 core at the 0.5% threshold (27 * 8 uL = 0.216 mL, under
    # the 0.5 mL rule set below) in a 7x7x7 shoulder at the 2% threshold (2.744 mL); and a
    # shoulder alone, with no voxel reaching the 1% operating threshold
    heat[3:10, 3:10, 3:10] = cal.threshold_for_fpr(0.02)
    heat[5:8, 5:8, 5:8] = cal.threshold_for_fpr(0.005)
    heat[18:25, 18:25, 18:25] = cal.threshold_for_fpr(0.02)
    from SpatialMSMALib.detection import Detection

    detection = Detection(heat, np.ones(heat.shape, bool), np.zeros(heat.shape, np.int16),
                          np.diag([2.0, 2.0, 2.0, 1.0]), 0.0, 0.0, float(cal.scores[-1]), [],
                          None, None, None)
    sized = with_post_processing(model, min_component_ml=0.5)
    assert relabel(detection, sized, fpr=0.01).components == []  # the core alone is too small
    grown = with_post_processing(sized, grow_rate_factor=3.0)  # extent at the 3% threshold
    result = relabel(detection, grown, fpr=0.01)
    assert len(result.components) == 1
    assert result.components[0].volume_ml == pytest.approx(343 * 8 / 1000)  # the shoulder
    assert result.labels[4, 4, 4] == 1 and result.labels[20, 20, 20] == 0
    rules = result.report(grown)["model"]["post_processing"]
    assert rules["grow_rate_factor"] == 3.0
    assert rules["extent_threshold"] == pytest.approx(model.calibration.threshold_for_fpr(0.03))
    # a factor too small to reach the shoulder (1.5% < 2%) changes nothing
    assert relabel(detection, with_post_processing(sized, grow_rate_factor=1.5),
                   fpr=0.01).components == []
    # the thresholds themselves: extent at 3x the rate, peak at the operating threshold
    threshold = cal.threshold_for_fpr(0.01)
    extent, peak = grown.calibration.labelling_thresholds(threshold)
    assert extent == pytest.approx(cal.threshold_for_fpr(0.03)) and peak == threshold
    assert sized.calibration.labelling_thresholds(threshold) == (threshold, None)
    assert grown.calibration.labelling_thresholds(cal.threshold_for_fpr(0.5))[0] == (
        pytest.approx(cal.threshold_for_fpr(1.0)))  # capped at a rate of 1
    ruled = with_post_processing(grown, max_peak_fpr=1e-3)  # the stricter peak rule wins
    assert ruled.calibration.labelling_thresholds(threshold)[1] == pytest.approx(
        cal.threshold_for_fpr(1e-3))
    from SpatialMSMALib.errors import InputError

    with pytest.raises(InputError, match="must exceed 1"):
        with_post_processing(model, grow_rate_factor=0.5)


def test_set_post_processing_writes_a_new_file_and_keeps_the_input(detection_setup, tmp_path,
                                                                    capsys):
    from set_post_processing import main

    from SpatialMSMALib.model import AnomalyModel

    source = detection_setup["path"]
    before = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    out = tmp_path / "ruled.pt"
    assert main(["--model", str(source), "--out", str(out), "--max-peak-fpr", "0.001",
                 "--min-component-ml", "0.5"]) == 0
    assert hashlib.sha256(Path(source).read_bytes()).hexdigest() == before
    loaded, original = AnomalyModel.load(out), AnomalyModel.load(source)
    assert loaded.calibration.max_peak_fpr == 0.001
    assert loaded.calibration.min_component_ml == 0.5
    assert loaded.calibration.scores == original.calibration.scores  # quantiles unchanged
    change = loaded.calibration.notes["post_processing_changes"][-1]
    assert change["previous"] == {"max_peak_fpr": None, "min_component_ml": 0.2}
    assert loaded.provenance["post_processing_changed"]["new"]["max_peak_fpr"] == 0.001
    # 'none' turns the rule off again; nothing is overwritten unless asked
    capsys.readouterr()
    assert main(["--model", str(out), "--out", str(tmp_path / "off.pt"),
                 "--max-peak-fpr", "none"]) == 0
    assert AnomalyModel.load(tmp_path / "off.pt").calibration.max_peak_fpr is None
    assert main(["--model", str(source), "--out", str(out), "--max-peak-fpr", "0.001"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    # a rule looser than the default operating rate is refused with a clear message
    assert main(["--model", str(source), "--out", str(tmp_path / "bad.pt"),
                 "--max-peak-fpr", "0.05"]) == 2
    assert "peak false-positive rate" in capsys.readouterr().err
    assert main(["--model", str(source), "--out", str(tmp_path / "bad.pt"),
                 "--default-fpr", "2"]) == 2
    assert "default false-positive rate" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(SystemExit):
        main(["--model", str(source), "--out", str(source), "--max-peak-fpr", "0.001"])


def test_a_model_file_with_an_unusable_calibration_is_refused_naming_it(detection_setup,
                                                                         tmp_path):
    from dataclasses import replace

    from SpatialMSMALib.errors import InputError
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.spatial import Calibration

    model = detection_setup["model"]
    broken = replace(model, calibration=Calibration.__new__(Calibration))
    broken.calibration.__dict__.update(model.calibration.__dict__, max_peak_fpr=0.5)
    path = broken.save(tmp_path / "broken.pt")
    with pytest.raises(InputError, match="broken.pt.*peak false-positive rate"):
        AnomalyModel.load(path)


def test_post_processing_sweep_matches_the_benchmark_and_growth_only_adds(detection_setup,
                                                                           tmp_path):
    """benchmarks/post_processing_sweep.py on a two-scan cohort: its no-growth row is the
    figure spatial_3d.py computes at that rate, and growing components never loses a lesion
    nor flags less healthy tissue."""
    from conftest import load_benchmark_script, two_scan_test_cohort

    by_name = two_scan_test_cohort(tmp_path / "cohort")
    rows = by_name["test_healthy"] + by_name["test_lesioned"]
    import dataclasses

    model = dataclasses.replace(detection_setup["model"],  # a feature-cache key, as trained
                                provenance={"score_checkpoint_sha256": "0" * 64})
    sweep = load_benchmark_script("post_processing_sweep")
    rates, factors = (0.01, 0.003), (None, 3.0)
    result = sweep.sweep_split(model, rows, tmp_path / "cache", rates, factors)
    assert set(result) == {f"{r}|{f}" for r in rates for f in factors}
    reference = load_benchmark_script("spatial_3d").evaluate_split(
        model, rows, tmp_path / "cache", "cpu", sweep_fprs=list(rates))["operating_points"]
    for rate, row in zip(rates, reference, strict=True):
        assert result[f"{rate}|None"] == row
        grown = result[f"{rate}|3.0"]
        assert grown["pooled_lesion_tpr"] >= row["pooled_lesion_tpr"]
        assert grown["healthy_median_flagged_ml"] >= row["healthy_median_flagged_ml"]
    # growth at 3x 0.3% reaches down to 0.9%: it must label more than the plain 0.3% does
    # on this scan pair, or the test would not exercise the rule
    assert (result["0.003|3.0"]["healthy_median_flagged_ml"]
            + result["0.003|3.0"]["pooled_lesion_tpr"]
            > result["0.003|None"]["healthy_median_flagged_ml"]
            + result["0.003|None"]["pooled_lesion_tpr"])

    # a flow that reads intensities only: both scripts skip the score network (no feature
    # cache is written) and still agree on every operating point
    from SpatialMSMALib.spatial import SpatialFlow, SpatialFlowConfig

    torch.manual_seed(0)
    flow = SpatialFlow(SpatialFlowConfig(num_features=4, flow_layers=1, hidden=8,
                                         position_frequencies=1, global_features=0,
                                         intensity_features=True, score_features=False)).eval()
    flow.set_feature_statistics(torch.randn(64, 2))
    intensity_model = dataclasses.replace(
        model, spatial=flow, provenance={"score_checkpoint_sha256": "1" * 64})
    from SpatialMSMALib.dataset import model_space
    from SpatialMSMALib.detection import model_heat_map
    from SpatialMSMALib.spatial import Calibration

    healthy_scan = model_space(by_name["test_healthy"], tmp_path / "cache", model.spacing_mm,
                               progress=False)[0]
    no_norms = np.zeros((0, *healthy_scan.brain_mask.shape), np.float32)
    heat = model_heat_map(intensity_model, healthy_scan.image, healthy_scan.brain_mask,
                          no_norms)
    intensity_model.calibration = Calibration.from_healthy(
        [heat[np.isfinite(heat)]], min_component_ml=0.0, smoothing_mm=2.0)
    feature_dir = tmp_path / "cache" / intensity_model.feature_cache_name()
    mine = load_benchmark_script("spatial_3d").evaluate_split(
        intensity_model, rows, tmp_path / "cache", "cpu", sweep_fprs=list(rates))
    assert not feature_dir.exists()
    swept = sweep.sweep_split(intensity_model, rows, tmp_path / "cache", rates, (None,))
    import json

    assert (json.dumps([swept[f"{rate}|None"] for rate in rates])
            == json.dumps(mine["operating_points"]))
    # calibrated on the healthy scan itself, the intensity model flags some of it at 1%, so
    # the comparison above is not between two empty label maps
    assert mine["operating_points"][0]["healthy_median_flagged_ml"] > 0
