"""training/fit_msma.py end to end on a tiny cohort and a tiny score model (slow: it
preprocesses 8 scans, about 4 minutes on 2 cores)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from SpatialMSMALib.cohort import CohortSizes, make_benchmark
from SpatialMSMALib.model import AnomalyModel
from SpatialMSMALib.score.features import FEATURE_VERSION

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fit_msma_writes_a_loadable_model_with_cross_fitted_references(tmp_path):
    cohort = tmp_path / "cohort"
    sizes = CohortSizes(n_train=6, n_val=2, n_test_healthy=0, n_test_lesioned=0,
                        n_loao_healthy=0, n_loao_lesioned=0)
    make_benchmark(cohort, sizes=sizes, seed=4, progress=False)
    run = tmp_path / "run"
    tiny = ["--channels", "4", "8", "--embed-dim", "8", "--crop", "16", "--batch-size", "2",
            "--num-levels", "4", "--warmup-steps", "1", "--steps", "2"]
    subprocess.run([sys.executable, str(ROOT / "training" / "train_score.py"), "--manifest",
                    str(cohort), "--out", str(run), *tiny], check=True, timeout=900)
    out = tmp_path / "model.pt"
    command = [sys.executable, str(ROOT / "training" / "fit_msma.py"), "--score-checkpoint",
               str(run / "last.pt"), "--manifest", str(cohort), "--out", str(out), "--cache",
               str(run / "cache"), "--models", "gmm", "knn"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    model = AnomalyModel.load(out)
    assert model.provenance["n_healthy"] == 8
    assert sorted(model.typicality.models) == ["gmm", "knn"]
    assert len(model.typicality.reference_scores["gmm"]) == 8  # out-of-fold, one per scan
    features = np.stack([np.load(p)["whole"] for p in sorted((run / "cache").glob(
        "features_*/*.npz"))])
    assert features.shape == (8, 4) and (features > 0).all()
    # the cached features are what the stored k-NN reference was built from
    # (to 1e-4 healthy SDs: the stored mean/scale are float32, and the untrained tiny net's
    # norms barely vary between scans, so float32 rounding of the mean is amplified ~1e-5)
    np.testing.assert_allclose(
        np.sort(model.typicality.models["knn"].reference, axis=0),
        np.sort(model.typicality.transform(features), axis=0), atol=1e-4)
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # --model refits only the typicality model of a model file: same cached features, so the
    # same healthy references; the score network is kept and the refit is recorded
    refit = tmp_path / "refit.pt"
    result = subprocess.run([*command[:2], "--model", str(out), *command[4:6], "--out",
                             str(refit), *command[8:]], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    again_model = AnomalyModel.load(refit)
    np.testing.assert_array_equal(again_model.typicality.reference_scores["gmm"],
                                  model.typicality.reference_scores["gmm"])
    for name, tensor in model.score_net.state_dict().items():
        assert torch.equal(again_model.score_net.state_dict()[name], tensor), name
    assert again_model.provenance["typicality_refit_of"]["name"] == "model.pt"
    assert again_model.provenance["typicality_feature_version"] == FEATURE_VERSION
    bad = tmp_path / "not_a_model.pt"
    bad.write_text("not a checkpoint")
    result = subprocess.run([*command[:2], "--model", str(bad), *command[4:6], "--out",
                             str(tmp_path / "x.pt")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "not_a_model.pt" in result.stderr


def test_levels_option():
    sys.path.insert(0, str(ROOT / "training"))
    from fit_msma import typicality_levels

    from SpatialMSMALib.errors import InputError

    assert typicality_levels("all", 20) is None
    assert typicality_levels("every:1", 20) is None  # every level is no choice
    assert typicality_levels("every:2", 20) == list(range(0, 20, 2))
    assert typicality_levels("every:3", 7) == [0, 3, 6]
    assert typicality_levels("0,5,19", 20) == [0, 5, 19]
    for bad in ("every:0", "every:x", "20", "3-1"):
        with pytest.raises(InputError, match="--levels"):
            typicality_levels(bad, 20)


@pytest.mark.parametrize("atlas_ids", [False, True])
def test_max_refused_fraction_lets_a_refit_leave_out_more_scans(tmp_path, monkeypatch, capsys,
                                                                 atlas_ids):
    """``--max-refused-fraction``: with 3 of 10 healthy scans refused by registration the
    default (0.1) stops with the refused scans named, 0.4 refits on the other 7 (also when
    the refusals carry the ``<id>_atlasmask`` ids of a model without masks), and a value
    outside [0, 1) is refused by the parser. Scan preparation and features are replaced (the
    end-to-end run is the slow test above): only what the option decides is under test."""
    sys.path.insert(0, str(ROOT / "training"))
    import fit_msma

    from SpatialMSMALib.dataset import ScanFiles, without_brain_mask
    from SpatialMSMALib.score import GeometricNoiseSchedule, ScoreUNet

    torch.manual_seed(0)
    model = AnomalyModel(ScoreUNet(2, 2, (4, 8), 8).eval(), GeometricNoiseSchedule(0.05, 1.0, 4))
    model.provenance["score_checkpoint_sha256"] = "0" * 64  # names its feature cache
    model_path = model.save(tmp_path / "model.pt")
    rows = [ScanFiles(f"train_{i:03d}", tmp_path / f"{i}.nii.gz") for i in range(10)]
    refused_ids = {"train_001", "train_004", "train_007"}
    features = np.random.default_rng(0).uniform(1.0, 2.0, size=(10, 4)).astype(np.float32)

    def prepared(rows_in, *args, refused, **kwargs):
        refused.extend((without_brain_mask(r).id if atlas_ids else r.id,
                        "registration NCC 0.41 < 0.5") for r in rows_in if r.id in refused_ids)
        return [r for r in rows_in if r.id not in refused_ids]

    def scan_features(model, scans, *args, **kwargs):
        return features[[int(s.id[-3:]) for s in scans]], []

    monkeypatch.setattr(fit_msma, "manifest_scans", lambda path, splits: {
        "train": rows[:8], "val": rows[8:]})
    monkeypatch.setattr(fit_msma, "model_space", prepared)
    monkeypatch.setattr(fit_msma, "cached_features", scan_features)
    command = ["--model", str(model_path), "--manifest", str(tmp_path / "cohort"),
               "--models", "knn", "--device", "cpu"]

    assert fit_msma.main([*command, "--out", str(tmp_path / "a.pt")]) == 2
    err = capsys.readouterr().err
    assert "3 of 10 scans" in err and all(scan_id in err for scan_id in refused_ids)
    assert not (tmp_path / "a.pt").exists()

    assert fit_msma.main([*command, "--out", str(tmp_path / "b.pt"),
                          "--max-refused-fraction", "0.4"]) == 0
    refit = AnomalyModel.load(tmp_path / "b.pt")
    assert refit.provenance["n_healthy"] == 7
    # the digest of the 7 kept scans, as train_spatial.py records its own (atlas-suffixed) ids
    from SpatialMSMALib.dataset import healthy_ids_digest

    kept = [r.id for r in rows if r.id not in refused_ids]
    assert refit.provenance["healthy_ids_sha256"] == healthy_ids_digest(
        [without_brain_mask(r).id for r in reversed(rows) if r.id not in refused_ids])
    assert refit.provenance["healthy_ids_sha256"] != healthy_ids_digest(kept[:-1])
    assert len(refit.typicality.reference_scores["knn"]) == 7

    with pytest.raises(SystemExit) as exit_info:
        fit_msma.main([*command, "--out", str(tmp_path / "c.pt"),
                       "--max-refused-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert "--max-refused-fraction" in capsys.readouterr().err
