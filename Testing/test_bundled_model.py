"""The bundled model: registry integrity, and `spatial-msma demo` end to end with it."""

import hashlib
import json

import numpy as np
import pytest

from SpatialMSMALib.model import MODEL_DIR, REGISTRY, AnomalyModel, bundled_models, resolve_model
from SpatialMSMALib.score.features import FEATURE_VERSION


def test_registry_describes_the_installed_files():
    entries = bundled_models()
    assert entries, f"no bundled model registered in {REGISTRY}"
    for entry in entries:
        file = MODEL_DIR / entry["file"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]
        model = AnomalyModel.load(file)
        assert model.channel_names == entry["channels"]
        assert model.brain_masks == entry.get("brain_masks", "given")
        assert model.spatial is not None and model.typicality is not None
        assert model.calibration.default_threshold == pytest.approx(
            entry["calibration"]["default_threshold"])
        assert entry["calibration"].get("grow_rate_factor") == model.calibration.grow_rate_factor
        assert "NOT for clinical use" in entry["intended_use"]
        # the registry states the preprocessing version detection will repeat (entries
        # bundled before versions existed are version 1)
        assert model.preprocess_version == entry["grid"].get("preprocess_version", 1)
        # its typicality model was fitted on features computed as detection computes them
        assert entry["msma_typicality"]["feature_version"] == FEATURE_VERSION
        assert model.provenance["typicality_feature_version"] == FEATURE_VERSION
    from SpatialMSMALib.preprocessing import PREPROCESS_VERSION

    assert AnomalyModel.load().preprocess_version == PREPROCESS_VERSION  # the default: latest


def test_registry_quotes_the_committed_benchmark_and_the_flow_inputs():
    import sys

    sys.path.insert(0, str(MODEL_DIR.parents[1] / "training"))
    from bundle_model import flow_inputs, registry_benchmark

    for entry in bundled_models():
        model = AnomalyModel.load(MODEL_DIR / entry["file"])
        assert entry["flow_inputs"] == json.loads(json.dumps(flow_inputs(model)))
        source = MODEL_DIR.parents[1] / entry["benchmark"]["source"]
        measured = json.loads(json.dumps(registry_benchmark(json.loads(source.read_text()))))
        assert entry["benchmark"]["splits"] == measured["splits"]
        assert entry["benchmark"]["threshold"]["threshold"] == pytest.approx(
            model.calibration.default_threshold)


def test_registry_names_the_training_cohort_without_the_trainers_folders():
    import sys

    sys.path.insert(0, str(MODEL_DIR.parents[1] / "training"))
    from bundle_model import public_cohort

    assert public_cohort({"manifest": "/tmp/someone/aug", "splits": ["train", "val"]}) == {
        "manifest": "aug", "splits": ["train", "val"]}
    assert public_cohort({"data_dir": "/home/x/healthy_scans"}) == {"data_dir": "healthy_scans"}
    assert public_cohort({"manifest": ["/tmp/a/aug2x/manifest.json", "/tmp/b/benchmark"]}) == {
        "manifest": ["aug2x", "benchmark"]}
    assert public_cohort(None) is None
    for entry in bundled_models():
        for value in (entry["training_data"]["cohort"] or {}).values():
            assert "/" not in str(value), f"{entry['file']}: a local path in the registry"
        normative = entry["flow_inputs"].get("normative_contrast") or {}
        for name in (normative.get("fitted_on") or {}).get("cohorts", []):
            assert "/" not in name, f"{entry['file']}: a local path in the registry"


def test_bundling_checks_every_input_before_writing_anything(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(MODEL_DIR.parents[1] / "training"))
    from bundle_model import main

    registry_before = REGISTRY.read_bytes()
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps({"splits": {"test": {"summary": {}}}}))
    name = "never_installed.pt"
    code = main(["--model", str(MODEL_DIR / "spatial_msma.pt"), "--file", name,
                 "--benchmark", str(bad)])
    assert code == 2
    assert f"benchmark '{bad}': not a benchmarks/spatial_3d.py result" in capsys.readouterr().err
    assert not (MODEL_DIR / name).exists() and REGISTRY.read_bytes() == registry_before


def test_default_model_follows_the_inputs():
    two_channel = resolve_model(None, has_t2=True)
    assert two_channel.channel_names == ["T1", "T2"]
    if any(e["channels"] == ["T1"] for e in bundled_models()):
        assert resolve_model(None, has_t2=False).channel_names == ["T1"]
        from SpatialMSMALib.errors import InputError

        two_channel_file = MODEL_DIR / next(e["file"] for e in bundled_models()
                                            if e["channels"] == ["T1", "T2"])
        with pytest.raises(InputError, match="needs T1 \\+ T2; give --t2 for 'x_t1.nii.gz'"):
            resolve_model(two_channel_file, has_t2=False, t1_name="x_t1.nii.gz")
    else:
        from SpatialMSMALib.errors import InputError

        with pytest.raises(InputError, match="needs T1 \\+ T2"):
            resolve_model(None, has_t2=False, t1_name="x_t1.nii.gz")


def test_every_input_case_gets_a_bundled_model_made_for_it():
    """T1 + T2 or T1 alone, each with or without a brain mask: the bundled model chosen has
    the scan's channels and was trained the way the scan comes (with masks, or with every
    mask set aside), so none of the four cases runs a model outside its training."""
    for has_t2 in (True, False):
        for has_mask in (True, False):
            model = resolve_model(None, has_t2=has_t2, has_mask=has_mask)
            assert model.channel_names == (["T1", "T2"] if has_t2 else ["T1"])
            assert model.brain_masks == ("given" if has_mask else "atlas"), (has_t2, has_mask)


def test_demo_runs_with_the_bundled_model(tmp_path, capsys):
    from SpatialMSMALib.cli import main

    out = tmp_path / "demo"
    # 2 mm sample keeps the test short; the README's demo uses 1 mm
    assert main(["demo", "--out", str(out), "--spacing", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    metrics = report["demo"]["metrics_vs_simulated_lesions"]
    assert metrics["n_truth"] == len(report["demo"]["lesions"]) > 0
    assert f"lesion TPR {metrics['tpr']:.2f}" in printed
    # a trained model ranks lesion voxels above healthy brain voxels
    assert metrics["auroc"] > 0.7
    for name in ("heatmap.nii.gz", "labels.nii.gz", "figure.png", "input/sample_t1.nii.gz"):
        assert (out / name).exists()
    assert main(["demo", "--out", str(out), "--spacing", "2"]) == 2  # refuses to overwrite


def test_detect_with_t1_alone_uses_the_bundled_t1_only_model(tmp_path):
    """A T1 without T2 runs the T1-only model (no error), and its heat map still ranks the
    simulated (T1-hypointense) lesion voxels above the healthy brain."""
    import nibabel as nib

    from SpatialMSMALib.cli import main
    from SpatialMSMALib.demo import make_sample
    from SpatialMSMALib.metrics import voxel_auroc_auprc

    assert any(e["channels"] == ["T1"] for e in bundled_models()), "no T1-only model bundled"
    sample = make_sample(tmp_path / "input", seed=11, spacing=2.0)
    out = tmp_path / "out"
    assert main(["detect", "--t1", str(sample["paths"]["t1"]), "--mask",
                 str(sample["paths"]["brain_mask"]), "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["channels"] == ["T1"]
    assert not any("no brain mask" in w for w in report["warnings"])  # a mask was given
    heat = np.asarray(nib.load(out / "heatmap.nii.gz").dataobj)
    brain = np.asarray(nib.load(sample["paths"]["brain_mask"]).dataobj) > 0
    auroc, _ = voxel_auroc_auprc(heat, sample["lesion_mask"], brain)
    assert auroc > 0.7


def _bundling_into(tmp_path, monkeypatch):
    """``training/bundle_model.py`` pointed at a copy of the registry and the T1-only model
    under ``tmp_path / "Models"``; returns the module and that folder."""
    import shutil
    import sys

    sys.path.insert(0, str(MODEL_DIR.parents[1] / "training"))
    import bundle_model

    models = tmp_path / "Models"
    models.mkdir()
    shutil.copy(REGISTRY, models / "registry.json")
    shutil.copy(MODEL_DIR / "spatial_msma_t1.pt", models / "spatial_msma_t1.pt")
    monkeypatch.setattr(bundle_model, "MODEL_DIR", models)
    monkeypatch.setattr(bundle_model, "REGISTRY", models / "registry.json")
    return bundle_model, models


def test_refresh_keeps_the_entry_and_refuses_what_it_cannot_refresh(tmp_path, monkeypatch,
                                                                    capsys):
    """``bundle_model.py --refresh``: the entry keeps its figures, costs and training data and
    gets the file's checksum and typicality description; a file that is not bundled, or a
    model with other channels, is refused before anything is written."""
    bundle_model, models = _bundling_into(tmp_path, monkeypatch)
    before = json.loads((models / "registry.json").read_text())
    old = next(m for m in before["models"] if m["file"] == "spatial_msma_t1.pt")
    old["sha256"] = "stale"  # as if the file had been replaced
    (models / "registry.json").write_text(json.dumps(before))
    code = bundle_model.main(["--model", str(MODEL_DIR / "spatial_msma_t1.pt"), "--file",
                              "spatial_msma_t1.pt", "--refresh"])
    assert code == 0
    after = json.loads((models / "registry.json").read_text())
    new = next(m for m in after["models"] if m["file"] == "spatial_msma_t1.pt")
    assert new["sha256"] == hashlib.sha256((models / "spatial_msma_t1.pt").read_bytes()
                                           ).hexdigest()
    for key in ("benchmark", "expected_time", "training_data", "calibration"):
        assert new[key] == old[key], key
    assert new["msma_typicality"]["feature_version"] == AnomalyModel.load(
        models / "spatial_msma_t1.pt").provenance.get("typicality_feature_version", 1)
    snapshot = (models / "registry.json").read_bytes()
    for argv, message in (
            (["--model", str(MODEL_DIR / "spatial_msma_t1.pt"), "--file", "absent.pt",
              "--refresh"], "'absent.pt' is not a bundled model yet"),
            (["--model", str(MODEL_DIR / "spatial_msma.pt"), "--file", "spatial_msma_t1.pt",
              "--refresh"], "has channels ['T1', 'T2']")):
        assert bundle_model.main(argv) == 2
        assert message in capsys.readouterr().err
        assert (models / "registry.json").read_bytes() == snapshot
    assert not (models / "absent.pt").exists()


def test_refresh_with_a_same_run_cost_comparison_keeps_only_this_models_figures(
        tmp_path, monkeypatch):
    """A ``detect_cost.py --baseline`` result also times another model: the registry's
    ``expected_time`` gets this model's figures, not the baseline's or the ratio, and the
    commit of the code that ran them, not its local folder."""
    bundle_model, models = _bundling_into(tmp_path, monkeypatch)
    cost = {"input": "sample", "median_wall_s": 41.5, "wall_s": [40.0, 41.5, 43.0],
            "peak_rss_gb": 1.7, "model": "candidate.pt",
            "baseline": {"model": "old.pt", "median_wall_s": 50.0}, "ratio_to_baseline": 0.83,
            "code": {"commit": "e459f1d", "imported_from": "/home/someone/checkout"}}
    (tmp_path / "cost.json").write_text(json.dumps(cost))
    assert bundle_model.main(["--model", str(MODEL_DIR / "spatial_msma_t1.pt"), "--file",
                              "spatial_msma_t1.pt", "--refresh", "--cost",
                              str(tmp_path / "cost.json")]) == 0
    registry = json.loads((models / "registry.json").read_text())
    entry = next(m for m in registry["models"] if m["file"] == "spatial_msma_t1.pt")
    assert entry["expected_time"] == {"input": "sample", "median_wall_s": 41.5,
                                      "wall_s": [40.0, 41.5, 43.0], "peak_rss_gb": 1.7,
                                      "code": {"commit": "e459f1d"}}
