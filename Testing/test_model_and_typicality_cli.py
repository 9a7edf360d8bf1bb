"""The deployable model file and `spatial-msma typicality` end to end (tiny score net)."""

import json

import numpy as np
import pytest
import torch

from SpatialMSMALib.cli import main
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.inference import assess_typicality, compute_features, prepare
from SpatialMSMALib.io import Volume, save_volume
from SpatialMSMALib.model import AnomalyModel
from SpatialMSMALib.score import GeometricNoiseSchedule, ScoreUNet
from SpatialMSMALib.template import template_on_grid
from SpatialMSMALib.typicality import TypicalityModel


class _Scan:
    def __init__(self, image, brain_mask):
        self.image, self.brain_mask = image, brain_mask


class _ScanWithMapping(_Scan):
    class mapping:  # noqa: N801 - stands in for a preprocessing mapping
        registration_ncc = 0.9


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny untrained net; typicality fitted on features of noisy copies of the template."""
    torch.manual_seed(0)
    net = ScoreUNet(3, 2, (4, 8), 8).eval()
    anomaly_model = AnomalyModel(net, GeometricNoiseSchedule(0.05, 1.0, 4))
    template = template_on_grid()
    mask = template.brain_mask
    base = np.where(mask, template.t1 / np.percentile(template.t1[mask], 99) * 2 - 1, -1)
    rng = np.random.default_rng(0)
    features = []
    for _ in range(12):
        image = np.stack([base, -base]) + rng.normal(0, 0.05, (2, *mask.shape)) * mask
        _, whole = compute_features(anomaly_model, _Scan(image.astype(np.float32), mask))
        features.append(whole)
    anomaly_model.typicality = TypicalityModel.fit(np.stack(features), models=("gmm", "knn"))
    path = anomaly_model.save(tmp_path_factory.mktemp("model") / "model.pt")
    return anomaly_model, path


def test_model_file_round_trip(model):
    anomaly_model, path = model
    loaded = AnomalyModel.load(path)
    x = torch.randn(1, 2, 16, 16, 16)
    sigma = torch.tensor([0.3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.score_net(x, sigma), anomaly_model.score_net(x, sigma))
    torch.testing.assert_close(loaded.sigmas, anomaly_model.sigmas)
    probe = np.exp(np.random.default_rng(1).normal(size=(3, 4)))
    np.testing.assert_allclose(loaded.typicality.score(probe, "knn"),
                               anomaly_model.typicality.score(probe, "knn"))
    with pytest.raises(FileExistsError):
        anomaly_model.save(path)


def test_model_needs_t2_and_names_the_scan(model):
    anomaly_model, _ = model
    t1 = Volume(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(InputError, match="T1 \\+ T2.*scan_t1.nii.gz"):
        prepare(anomaly_model, t1, None, names={"t1": "scan_t1.nii.gz"})


def test_missing_model_file_is_a_clear_error(tmp_path, capsys):
    code = main(["typicality", str(tmp_path / "scan.nii.gz"), "--model",
                 str(tmp_path / "absent.pt")])
    assert code == 2
    assert "absent.pt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scan_files(tmp_path_factory):
    from SpatialMSMALib.anatomy import load_mni152_2009a
    from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject

    subject = synthesize_subject(load_mni152_2009a(), seed=5, config=SubjectConfig())
    folder = tmp_path_factory.mktemp("scan")
    paths = {}
    for name in ("t1", "t2", "brain_mask"):
        data = getattr(subject, name)
        paths[name] = save_volume(folder / f"s_{name}.nii.gz",
                                  data.astype(np.uint8) if name == "brain_mask" else data,
                                  subject.grid.affine)
    return paths


def test_typicality_cli_json_matches_the_library(model, scan_files, capsys):
    anomaly_model, path = model
    code = main(["typicality", str(scan_files["t1"]), "--t2", str(scan_files["t2"]),
                 "--mask", str(scan_files["brain_mask"]), "--model", str(path), "--json",
                 "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["scores"]) == {"gmm", "knn"}
    assert report["verdict"] == report["scores"]["gmm"]["verdict"]
    assert report["scores"]["knn"]["reference_size"] == 12
    from SpatialMSMALib.io import load_volume

    direct = assess_typicality(
        AnomalyModel.load(path), load_volume(scan_files["t1"]), load_volume(scan_files["t2"]),
        load_volume(scan_files["brain_mask"]))
    # same path, same numbers (the registration is reproducible bit for bit)
    assert report["scores"]["gmm"]["score"] == pytest.approx(direct.scores["gmm"]["score"],
                                                             rel=1e-9)
    norms = np.asarray(report["score_norms"])
    assert norms.shape == (4,) and (norms > 0).all()
    # the percentile is the fraction of the stored healthy reference below the score
    reference = anomaly_model.typicality.reference_scores["gmm"]
    expected = 100 * np.mean(reference < report["scores"]["gmm"]["score"])
    assert report["scores"]["gmm"]["percentile"] == pytest.approx(expected, abs=100 / 24)


def test_features_are_computed_in_ieee_float32(model, monkeypatch):
    """Every network pass of ``compute_features`` runs without autocast and with TF32 off
    (the typicality model reads these norms; bf16 moves them by ~1% and flips verdicts), and
    the caller's precision settings are restored afterwards."""
    anomaly_model, _ = model
    net = anomaly_model.score_net
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x, sigma):
            seen.append((torch.backends.cudnn.conv.fp32_precision,
                         torch.backends.cuda.matmul.fp32_precision,
                         torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"),
                         x.dtype))
            return net(x, sigma)

    monkeypatch.setattr(anomaly_model, "score_net", Recording())
    before = (torch.backends.cudnn.conv.fp32_precision,
              torch.backends.cuda.matmul.fp32_precision)
    assert before[0] != "ieee"  # torch's default for convolutions: TF32 allowed
    mask = template_on_grid(4.0, (48, 56, 48)).brain_mask
    image = np.zeros((2, *mask.shape), np.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even inside a caller's autocast
        _, whole = compute_features(anomaly_model, _Scan(image, mask))
    assert len(seen) == 2  # 4 noise levels, 2 per pass
    assert set(seen) == {("ieee", "ieee", False, False, torch.float32)}
    assert whole.dtype == np.float32
    assert (torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cuda.matmul.fp32_precision) == before


def test_typicality_with_a_level_subset_evaluates_only_those_levels(model, monkeypatch):
    """A typicality model that reads levels 1 and 3: ``compute_features`` is asked for those
    two (one network pass), they equal the full computation's rows, and the report holds
    ``None`` at the levels that were not evaluated."""
    from SpatialMSMALib import inference

    anomaly_model, _ = model
    mask = template_on_grid(4.0, (48, 56, 48)).brain_mask
    rng = np.random.default_rng(3)
    image = (rng.normal(0, 0.3, (2, *mask.shape)) * mask).astype(np.float32)
    scan = _Scan(image, mask)
    full_local, full_whole = compute_features(anomaly_model, scan)
    local, whole = compute_features(anomaly_model, scan, levels=[1, 3])
    np.testing.assert_allclose(whole, full_whole[[1, 3]], rtol=1e-5)
    np.testing.assert_allclose(local, full_local[[1, 3]], rtol=1e-5, atol=1e-6)

    subset_model = AnomalyModel(anomaly_model.score_net, anomaly_model.schedule)
    healthy = np.exp(rng.normal(0, 0.1, (12, 4))) * full_whole
    subset_model.typicality = TypicalityModel.fit(healthy, models=("gmm",), levels=[1, 3])
    assert inference.detection_levels(subset_model) == list(range(4))  # no flow: all levels
    asked = []
    real = inference.compute_features

    def recording(model_, scan_, device="cpu", progress=None, levels=None):
        asked.append(levels)
        return real(model_, scan_, device, progress, levels)

    monkeypatch.setattr(inference, "compute_features", recording)
    monkeypatch.setattr(inference, "prepare", lambda *a, **k: _ScanWithMapping(image, mask))
    monkeypatch.setattr(inference, "contrast_problems", lambda *a, **k: [])
    report = inference.assess_typicality(subset_model, None, None, primary="gmm")
    assert asked == [[1, 3]]
    assert report.whole_features[0] is None and report.whole_features[2] is None
    np.testing.assert_allclose([report.whole_features[1], report.whole_features[3]],
                               full_whole[[1, 3]], rtol=1e-5)
    assert report.scores["gmm"]["score"] == pytest.approx(
        float(subset_model.typicality.score(full_whole[None])[0]), rel=1e-4)


def test_detection_evaluates_only_the_levels_something_reads(model):
    """A flow on intensities reads no score norms: detection then evaluates only the
    typicality model's levels, and none at all without a typicality model."""
    from types import SimpleNamespace

    from SpatialMSMALib.inference import detection_levels, full_levels

    anomaly_model, _ = model
    subset_model = AnomalyModel(anomaly_model.score_net, anomaly_model.schedule)
    subset_model.typicality = TypicalityModel(np.zeros(2), np.ones(2), levels=[1, 3])
    subset_model.spatial = SimpleNamespace(config=SimpleNamespace(score_features=True))
    assert detection_levels(subset_model) == [0, 1, 2, 3]
    subset_model.spatial = SimpleNamespace(config=SimpleNamespace(score_features=False))
    assert detection_levels(subset_model) == [1, 3]
    subset_model.typicality.levels = None
    assert detection_levels(subset_model) == [0, 1, 2, 3]
    subset_model.typicality = None
    assert detection_levels(subset_model) == []
    mask = template_on_grid(4.0, (48, 56, 48)).brain_mask
    local, whole = compute_features(subset_model, _Scan(np.zeros((2, *mask.shape),
                                                                 np.float32), mask), levels=[])
    assert local.shape == (0, *mask.shape) and whole.shape == (0,)
    np.testing.assert_array_equal(full_levels(subset_model, [2], np.array([5.0])),
                                  [np.nan, np.nan, 5.0, np.nan])


def test_typicality_warns_about_a_thick_t2(model, scan_files):
    """The scan-level verdict moves on thick-slice scans (benchmarks/thick_slices.py), so the
    typicality command gives detect's warning for them too."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from thick_slices import thick_slices

    from SpatialMSMALib.io import load_volume

    anomaly_model, _ = model
    t1, mask = load_volume(scan_files["t1"]), load_volume(scan_files["brain_mask"])
    t2 = load_volume(scan_files["t2"])
    thin = assess_typicality(anomaly_model, t1, t2, mask)
    assert not [w for w in thin.warnings if "coarser than the model" in w]
    thick = assess_typicality(anomaly_model, t1, thick_slices(t2, 3), mask,
                              names={"t2": "thick_t2.nii.gz"})
    coarse = [w for w in thick.warnings if "coarser than the model" in w]
    assert len(coarse) == 1
    assert coarse[0].startswith("T2 'thick_t2.nii.gz' has voxels of 2.0 x 2.0 x 6.0 mm")
