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
