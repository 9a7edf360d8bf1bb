"""Models trained with every brain mask set aside (``brain_masks == "atlas"``): preprocessing
ignores a given mask, so such a model sees a scan the same with or without one; the model
file records the choice, the training cache keeps those scans apart, and the bundled model
for a scan is chosen by whether it has a mask."""

import copy
import json
import shutil

import numpy as np
import pytest


def atlas_copy(model):
    twin = copy.copy(model)
    twin.brain_masks = "atlas"
    return twin


@pytest.mark.usefixtures("reuse_registrations")
def test_an_atlas_model_detects_the_same_with_or_without_the_mask(detection_setup):
    from SpatialMSMALib.detection import (
        GIVEN_MASK_SET_ASIDE_WARNING,
        NO_BRAIN_MASK_WARNING,
        detect,
    )
    from SpatialMSMALib.io import load_volume

    paths = detection_setup["paths"]
    t1, t2 = load_volume(paths["t1"]), load_volume(paths["t2"])
    mask = load_volume(paths["brain_mask"])
    model = atlas_copy(detection_setup["model"])
    with_mask = detect(model, t1, t2, mask)
    without = detect(model, t1, t2, None)
    # the given mask is not used anywhere: the heat map and the brain are the atlas path's
    np.testing.assert_array_equal(with_mask.heat, without.heat)
    np.testing.assert_array_equal(with_mask.brain_mask, without.brain_mask)
    assert not np.array_equal(with_mask.brain_mask, mask.data > 0)
    assert with_mask.warnings[-1] == GIVEN_MASK_SET_ASIDE_WARNING
    # a model trained that way is calibrated for the atlas path: no "no mask" warning
    assert NO_BRAIN_MASK_WARNING not in without.warnings
    assert GIVEN_MASK_SET_ASIDE_WARNING not in without.warnings
    assert with_mask.report(model)["model"]["brain_masks"] == "atlas"
    # (the given-mask model's brain is the given mask: test_without_mask.py)


def test_the_model_file_records_the_mask_source(detection_setup, tmp_path):
    from SpatialMSMALib.checkpoint import load_checkpoint, save_checkpoint
    from SpatialMSMALib.errors import InputError
    from SpatialMSMALib.model import AnomalyModel

    path = atlas_copy(detection_setup["model"]).save(tmp_path / "atlas.pt")
    loaded = AnomalyModel.load(path)
    assert loaded.brain_masks == "atlas"
    assert loaded.preprocess_config().brain_masks == "atlas"
    assert AnomalyModel.load(detection_setup["path"]).brain_masks == "given"
    # a file without the field (written before it existed) reads as "given"
    checkpoint = load_checkpoint(path)
    del checkpoint["config"]["brain_masks"]
    resave = ("old.pt", checkpoint["kind"], checkpoint["config"], checkpoint["states"],
              checkpoint["extra"])
    save_checkpoint(tmp_path / resave[0], *resave[1:])
    assert AnomalyModel.load(tmp_path / "old.pt").brain_masks == "given"
    checkpoint["config"]["brain_masks"] = "robex"
    save_checkpoint(tmp_path / "bad.pt", *resave[1:])
    with pytest.raises(InputError, match=r"bad\.pt.*brain-mask source 'robex'"):
        AnomalyModel.load(tmp_path / "bad.pt")


@pytest.mark.usefixtures("reuse_registrations")
def test_model_space_keeps_atlas_scans_apart_in_the_cache(detection_setup, tmp_path):
    from SpatialMSMALib.dataset import ScanFiles, model_space
    from SpatialMSMALib.inference import prepare
    from SpatialMSMALib.io import load_volume

    paths = detection_setup["paths"]
    row = ScanFiles("s0", paths["t1"], paths["t2"], paths["brain_mask"])
    cache = tmp_path / "cache"
    given = model_space([row], cache, progress=False)[0]
    atlas = model_space([row], cache, progress=False, brain_masks="atlas")[0]
    assert (given.id, atlas.id) == ("s0", "s0_atlasmask")
    assert sorted(p.name for p in cache.glob("*.npz")) == ["s0_2mm.npz",
                                                          "s0_atlasmask_2mm.npz"]
    # the atlas entry is the scan preprocessed without its mask
    t1, t2 = load_volume(paths["t1"]), load_volume(paths["t2"])
    reference = prepare(atlas_copy(detection_setup["model"]), t1, t2, None)
    np.testing.assert_array_equal(atlas.image, reference.image)
    np.testing.assert_array_equal(atlas.brain_mask, reference.brain_mask)
    assert not np.array_equal(atlas.image, given.image)
    # read back from the cache: the same
    again = model_space([row], cache, progress=False, brain_masks="atlas")[0]
    np.testing.assert_array_equal(again.image, atlas.image)
    with pytest.raises(ValueError, match="brain_masks"):
        model_space([row], cache, progress=False, brain_masks="none")


@pytest.mark.usefixtures("reuse_registrations")
def test_the_bundled_model_is_chosen_by_whether_a_mask_is_given(detection_setup, tmp_path,
                                                                 monkeypatch):
    import SpatialMSMALib.model as model_module
    import SpatialMSMALib.registry as registry

    atlas_copy(detection_setup["model"]).save(tmp_path / "nomask.pt")
    shutil.copy(detection_setup["path"], tmp_path / "mask.pt")
    channels = list(detection_setup["model"].channel_names)
    entries = [{"file": "nomask.pt", "channels": channels, "brain_masks": "atlas"},
               {"file": "mask.pt", "channels": channels}]
    (tmp_path / "registry.json").write_text(json.dumps({"models": entries}))
    monkeypatch.setattr(registry, "REGISTRY", tmp_path / "registry.json")
    monkeypatch.setattr(model_module, "MODEL_DIR", tmp_path)
    resolve = model_module.resolve_model
    assert resolve(None, has_t2=True, has_mask=True).brain_masks == "given"
    assert resolve(None, has_t2=True, has_mask=False).brain_masks == "atlas"
    # with only one of them installed, it serves both
    (tmp_path / "registry.json").write_text(json.dumps({"models": entries[1:]}))
    assert resolve(None, has_t2=True, has_mask=False).brain_masks == "given"
    # a model file given by path is taken as it is
    assert resolve(tmp_path / "nomask.pt", has_t2=True, has_mask=True).brain_masks == "atlas"


def test_preprocess_config_refuses_an_unknown_mask_source():
    from SpatialMSMALib.preprocessing import PreprocessConfig

    with pytest.raises(ValueError, match="brain_masks must be one of given, atlas"):
        PreprocessConfig(brain_masks="robex")


@pytest.mark.usefixtures("reuse_registrations")
def test_the_benchmark_lists_refused_scans_and_counts_their_lesions_as_missed(
        detection_setup, tmp_path):
    """benchmarks/spatial_3d.py with an atlas model: a scan whose registration is refused
    (here by a cached refusal note) is listed with its lesions, left out of the cases, and
    its lesions count as missed in the figure that includes refused scans."""
    import dataclasses

    from conftest import load_benchmark_script, two_scan_test_cohort

    from SpatialMSMALib.metrics import component_detection
    from SpatialMSMALib.preprocessing import PREPROCESS_VERSION, REGISTRATION_RETRY

    by_name = two_scan_test_cohort(tmp_path / "cohort")
    rows = by_name["test_healthy"] + by_name["test_lesioned"]
    model = dataclasses.replace(atlas_copy(detection_setup["model"]),
                                provenance={"score_checkpoint_sha256": "0" * 64})
    cache = tmp_path / "cache"
    cache.mkdir()
    lesioned = by_name["test_lesioned"][0]
    (cache / f"{lesioned.id}_atlasmask_2mm.refused.json").write_text(json.dumps(
        {"preprocess_version": PREPROCESS_VERSION, "reason": "NCC 0.40 < 0.5",
         "registration_retry": REGISTRATION_RETRY}))
    benchmark = load_benchmark_script("spatial_3d")
    result = benchmark.evaluate_split(model, rows, cache, "cpu")
    assert [c["id"] for c in result["cases"]] == [by_name["test_healthy"][0].id]
    [refused] = result["refused"]
    assert (refused["id"], refused["reason"]) == (lesioned.id, "NCC 0.40 < 0.5")
    from SpatialMSMALib.io import load_volume

    truth = load_volume(lesioned.lesion_mask)
    expected = component_detection(np.zeros(truth.shape, bool), truth.data > 0,
                                   truth.spacing)["truth_sizes_mm3"]
    assert refused["lesions_mm3"] == expected and len(expected) > 0
    summary = benchmark.refused_summary(result["cases"], result["refused"])
    assert summary["n_refused"] == 1
    has_large = any(s >= 500 for s in expected)
    assert summary["pooled_tpr_lesions_ge_0.5ml_refused_as_missed"] == (0.0 if has_large
                                                                        else None)


def test_a_refusal_without_a_mask_says_a_mask_may_help(detection_setup, monkeypatch):
    """Registration of the whole head fails on some anatomies where the brain alone
    registers: a refusal of a scan registered without a mask says so, and one of a scan
    whose mask an atlas model set aside names the other model. (The registration is replaced
    by a transform 40 mm off, as is the retry's every candidate, and the quality gate raised
    above any NCC, so every scan is refused by the gate, without the cost of registering.)"""
    import SpatialMSMALib.preprocessing as preprocessing
    from SpatialMSMALib.errors import RegistrationError
    from SpatialMSMALib.io import load_volume
    from SpatialMSMALib.preprocessing import PreprocessConfig, preprocess_scan

    paths = detection_setup["paths"]
    t1, mask = load_volume(paths["t1"]), load_volume(paths["brain_mask"])
    off = np.eye(4)
    off[:3, 3] = [0.0, 40.0, 0.0]
    monkeypatch.setattr(preprocessing, "register_to_template", lambda *a, **k: off.copy())
    monkeypatch.setattr(preprocessing, "retry_from_scaled_starts",
                        lambda *a, **k: [off.copy(), off.copy()])
    strict = {"refuse_ncc": 0.999, "warn_ncc": 0.999}
    with pytest.raises(RegistrationError, match=r"NCC .* < 0\.999.* registered without a "
                                                r"brain mask \(the whole head\); with one"):
        preprocess_scan(t1, None, None, PreprocessConfig(**strict))
    with pytest.raises(RegistrationError, match="This model sets brain masks aside; the model "
                                                "for scans with a brain mask"):
        preprocess_scan(t1, None, mask, PreprocessConfig(brain_masks="atlas", **strict))


def test_the_benchmark_runs_a_model_trained_with_masks_without_them(detection_setup, tmp_path):
    """``spatial_3d.py --without-masks``: a copy of a mask-trained model that takes every
    scan through the no-mask path (here both scans are refused by cached no-mask refusal
    notes, which only that path reads), with the same calibration; the model itself is not
    changed."""
    import dataclasses

    from conftest import load_benchmark_script, two_scan_test_cohort

    from SpatialMSMALib.preprocessing import PREPROCESS_VERSION, REGISTRATION_RETRY

    by_name = two_scan_test_cohort(tmp_path / "cohort")
    rows = by_name["test_healthy"] + by_name["test_lesioned"]
    model = dataclasses.replace(detection_setup["model"],
                                provenance={"score_checkpoint_sha256": "0" * 64})
    assert model.brain_masks == "given"
    benchmark = load_benchmark_script("spatial_3d")
    twin = benchmark.with_masks_set_aside(model)
    assert (twin.brain_masks, model.brain_masks) == ("atlas", "given")
    assert twin.calibration is model.calibration and twin.spatial is model.spatial
    cache = tmp_path / "cache"
    cache.mkdir()
    for row in rows:
        (cache / f"{row.id}_atlasmask_2mm.refused.json").write_text(json.dumps(
            {"preprocess_version": PREPROCESS_VERSION, "reason": f"NCC 0.3 for {row.id}",
             "registration_retry": REGISTRATION_RETRY}))
    result = benchmark.evaluate_split(twin, rows, cache, "cpu")
    assert result["cases"] == []
    assert [(r["id"], r["reason"]) for r in result["refused"]] == [
        (r.id, f"NCC 0.3 for {r.id}") for r in rows]
