"""training/train_spatial.py: option errors are reported before any work."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_spatial.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def _assert_refused_before_any_work(tmp_path, message, *options):
    out = tmp_path / "model.pt"
    result = _run("--data-dir", tmp_path, "--out", out, *options)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "model.pt.work").exists()


def test_a_flow_without_inputs_is_refused_before_any_work(tmp_path):
    _assert_refused_before_any_work(
        tmp_path, "--flow-score-features false needs --flow-intensity-features true",
        "--flow-score-features", "false")


def test_a_boolean_option_rejects_other_words(tmp_path):
    result = _run("--data-dir", tmp_path, "--out", tmp_path / "m.pt",
                  "--flow-intensity-features", "maybe")
    assert result.returncode == 2
    assert "--flow-intensity-features" in result.stderr
    assert "expected true or false" in result.stderr


def test_a_malformed_level_selection_is_refused_before_any_work(tmp_path):
    _assert_refused_before_any_work(tmp_path, "--flow-score-levels: score levels 'low'",
                                    "--flow-score-levels", "low")


def test_an_invalid_demons_setting_is_refused_before_any_work(tmp_path):
    _assert_refused_before_any_work(tmp_path, "--demons-iterations / --demons-smoothing-vox",
                                    "--demons-iterations", "-3")
    _assert_refused_before_any_work(tmp_path, "smoothing_vox > 0",
                                    "--demons-iterations", "20", "--demons-smoothing-vox", "0")


def test_add_normative_refuses_an_existing_output_and_a_score_norm_flow(detection_setup,
                                                                        tmp_path):
    script = ROOT / "training" / "add_normative.py"
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"keep me")
    common = ["--model", str(detection_setup["path"]), "--data-dir", str(tmp_path),
              "--work", str(tmp_path / "work")]
    result = subprocess.run([sys.executable, str(script), *common, "--out", str(taken)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "taken.pt' exists" in result.stderr
    assert taken.read_bytes() == b"keep me"
    # the test model's flow reads score norms: it needs retraining, not this script
    result = subprocess.run([sys.executable, str(script), *common,
                             "--out", str(tmp_path / "new.pt")], capture_output=True, text=True)
    assert result.returncode == 2 and "reads score norms" in result.stderr
    assert "train_spatial.py --normative-contrast true" in result.stderr
    assert not (tmp_path / "new.pt").exists() and not (tmp_path / "work").exists()


def test_flow_members_must_be_at_least_one(tmp_path):
    _assert_refused_before_any_work(tmp_path, "--flow-members 0", "--flow-members", "0")


def test_a_grow_factor_of_at_most_one_is_refused(tmp_path):
    result = _run("--data-dir", tmp_path, "--out", tmp_path / "m.pt", "--grow-rate-factor", "1")
    assert result.returncode == 2 and "--grow-rate-factor" in result.stderr
    assert "must exceed 1" in result.stderr and not (tmp_path / "m.pt").exists()


def test_bad_normative_blob_sizes_are_refused_before_any_work(tmp_path):
    for sizes in ("2,-4", "2,x", ""):
        _assert_refused_before_any_work(tmp_path, f"--normative-blob-mm '{sizes}'",
                                        "--normative-blob-mm", sizes)


def _tiny_cohort_and_score_model(tmp_path, seed):
    """A 4 mm cohort of 3 train and 2 val healthy scans and an untrained 4-level score
    network saved as a model file: ``(manifest, score model path)``."""
    import torch

    from SpatialMSMALib.cohort import CohortSizes, make_benchmark
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.score import GeometricNoiseSchedule, ScoreUNet
    from SpatialMSMALib.synthesis import SubjectConfig

    sizes = CohortSizes(n_train=3, n_val=2, n_test_healthy=0, n_test_lesioned=0,
                        n_loao_healthy=0, n_loao_lesioned=0)
    manifest = make_benchmark(tmp_path / "cohort", sizes=sizes, seed=seed, progress=False,
                              subject_config=SubjectConfig(spacing_mm=4.0))
    torch.manual_seed(0)
    source = AnomalyModel(ScoreUNet(3, 2, (4, 8), 8).eval(),
                          GeometricNoiseSchedule(0.05, 1.0, 4), spacing_mm=4.0,
                          shape=(48, 56, 48)).save(tmp_path / "score_source.pt")
    return manifest, source


def test_train_spatial_end_to_end_with_two_flows_and_the_normative_model(tmp_path):
    """The whole script on a tiny 4 mm cohort (3 train, 2 val scans; a tiny score network):
    two flows from seeds 0 and 1 in their own folders, their ensemble in the model file, the
    normative contrast model fused with it, and ``--recalibrate`` reproducing the calibration
    from the trained flows without training again."""
    sys.path.insert(0, str(ROOT / "training"))
    import torch
    import train_spatial

    from SpatialMSMALib.checkpoint import load_checkpoint
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.spatial import FlowEnsemble

    manifest, source = _tiny_cohort_and_score_model(tmp_path, seed=5)
    work, out = tmp_path / "work", tmp_path / "model.pt"
    options = ["--manifest", str(manifest), "--score-checkpoint", str(source),
               "--work", str(work), "--out", str(out), "--flow-members", "2",
               "--normative-contrast", "true", "--normative-blob-mm", "4,8,16",
               "--aux-models", "knn", "--grow-rate-factor", "3",
               "--steps", "30", "--warmup-steps", "5", "--validate-every", "10",
               "--checkpoint-every", "10", "--scans-per-batch", "2",
               "--locations-per-scan", "64", "--val-locations-per-scan", "256",
               "--flow-flow-layers", "1", "--flow-hidden", "8", "--flow-global-features", "2",
               "--flow-position-frequencies", "2"]
    assert train_spatial.main(options) == 0
    model = AnomalyModel.load(out)
    assert isinstance(model.spatial, FlowEnsemble) and len(model.spatial) == 2
    seeds = [load_checkpoint(work / folder / "best.pt")["config"]["seed"]
             for folder in ("flow", "flow_1")]
    assert seeds == [0, 1]
    first, second = (m.state_dict() for m in model.spatial.members)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # two different flows
    provenance = model.provenance
    assert provenance["flow_members"] == 2 and len(provenance["flow_members_best_val_nll"]) == 2
    assert provenance["flow_best_val_nll"] == pytest.approx(
        sum(provenance["flow_members_best_val_nll"]) / 2)
    assert provenance["n_flow_train"] == 3 and provenance["n_flow_val"] == 2
    from SpatialMSMALib.dataset import healthy_ids_digest, manifest_scans

    cohort = manifest_scans(manifest, ("train", "val"))
    assert provenance["healthy_ids_sha256"] == healthy_ids_digest(
        r.id for split in ("val", "train") for r in cohort[split])
    assert model.normative is not None and model.heat_units == "-log10 FPR"
    assert model.normative.config.sigmas_vox == (1.0, 2.0, 4.0)  # mm on the 4 mm grid
    assert model.calibration.grow_rate_factor == 3.0
    assert set(model.component_calibrations) == {"flow", "normative"}
    # --recalibrate: the same flows (not retrained), the same calibration
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("flow*/best.pt")}
    assert len(stamps) == 2
    again = tmp_path / "again.pt"
    options[options.index(str(out))] = str(again)
    assert train_spatial.main(options + ["--recalibrate"]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.glob("flow*/best.pt")} == stamps
    recalibrated = AnomalyModel.load(again)
    assert recalibrated.calibration.scores == pytest.approx(model.calibration.scores)
    assert (recalibrated.component_calibrations["flow"].scores
            == pytest.approx(model.component_calibrations["flow"].scores))
    # --scan-standardization: each validation scan's component maps are brought to the
    # reference statistics (the medians over these scans of their raw maps' own), and the
    # calibrations are those of the standardised maps
    from SpatialMSMALib.dataset import manifest_scans, model_space
    from SpatialMSMALib.detection import component_heat_maps
    from SpatialMSMALib.inference import compute_features
    from SpatialMSMALib.scan_standardization import scan_statistics
    from SpatialMSMALib.spatial import scored_region

    standardised_path = tmp_path / "standardised.pt"
    options[options.index(str(again))] = str(standardised_path)
    assert train_spatial.main(options + ["--recalibrate", "--scan-standardization",
                                         "robust,ratio"]) == 0
    standardised = AnomalyModel.load(standardised_path)
    rules = standardised.scan_standardization
    assert {k: v.rule for k, v in rules.items()} == {"flow": "robust", "normative": "ratio"}
    assert rules["flow"].n_scans == 2
    val = model_space(manifest_scans(manifest, ("val",))["val"], work / "cache", 4.0,
                      progress=False)
    raw_stats, standardised_stats = [], []
    for scan in val:
        local, _ = compute_features(model, scan)
        region = scored_region(scan.brain_mask, model.calibration.rim_mm, 4.0)
        raw = component_heat_maps(model, scan.image, scan.brain_mask, local)
        factors = {}
        moved = component_heat_maps(standardised, scan.image, scan.brain_mask, local,
                                    scan_factors=factors)
        assert set(factors) == {"flow", "normative"}
        raw_stats.append([scan_statistics(m, region) for m in raw])
        standardised_stats.append([scan_statistics(m, region) for m in moved])
    for k, name in enumerate(("flow", "normative")):
        # (training read the score norms from its float16 cache: agreement to 1e-3)
        assert rules[name].reference_median == pytest.approx(
            np.median([s[k]["median"] for s in raw_stats]), rel=1e-3)
        for s in standardised_stats:  # every scan's map now has the reference median
            assert s[k]["median"] == pytest.approx(rules[name].reference_median, abs=1e-4)
    assert standardised_stats[0][0]["iqr"] == pytest.approx(rules["flow"].reference_iqr,
                                                           rel=1e-4)
    assert standardised.calibration.scores != pytest.approx(model.calibration.scores)
    assert standardised.calibration.notes["scan_standardization"]["normative"]["rule"] == "ratio"


def test_an_intensity_flow_trains_without_caching_local_score_norms(tmp_path):
    """A flow that reads intensities only never needs the local score-norm maps (41 MB per
    scan on the 2 mm grid at 20 levels): the cache keeps only the whole-brain vectors the
    typicality model is fitted on, and training and calibration run from the images."""
    sys.path.insert(0, str(ROOT / "training"))
    import train_spatial

    from SpatialMSMALib.model import AnomalyModel

    manifest, source = _tiny_cohort_and_score_model(tmp_path, seed=6)
    work, out = tmp_path / "work", tmp_path / "model.pt"
    assert train_spatial.main([
        "--manifest", str(manifest), "--score-checkpoint", str(source), "--work", str(work),
        "--out", str(out), "--flow-score-features", "false", "--flow-intensity-features",
        "true", "--aux-models", "knn", "--steps", "12", "--warmup-steps", "2",
        "--validate-every", "6", "--checkpoint-every", "6", "--scans-per-batch", "2",
        "--locations-per-scan", "64", "--val-locations-per-scan", "256",
        "--flow-flow-layers", "1", "--flow-hidden", "8", "--flow-global-features", "2",
        "--flow-position-frequencies", "2"]) == 0
    cached = sorted(work.glob("cache/features_*/*.npz"))
    assert len(cached) == 5
    for path in cached:
        with np.load(path) as arrays:
            assert set(arrays.files) == {"whole"} and arrays["whole"].shape == (4,)
    model = AnomalyModel.load(out)
    assert not model.spatial.config.score_features and model.spatial.config.intensity_features
    assert model.typicality is not None and np.isfinite(model.calibration.default_threshold)
