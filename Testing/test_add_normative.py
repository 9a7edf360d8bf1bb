"""training/add_normative.py end to end: adding the normative contrast model to a model whose
flow reads intensities only, and ``--reuse-normative`` recalibrating it with per-scan
standardisation without refitting it."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))


@pytest.fixture(scope="module")
def intensity_model_and_cohort(tmp_path_factory):
    """A 4 mm cohort (3 healthy train, 2 healthy val scans) and a model file whose untrained
    flow reads the two intensity channels only (no normative model yet)."""
    from SpatialMSMALib.cohort import CohortSizes, make_benchmark
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.score import GeometricNoiseSchedule, ScoreUNet
    from SpatialMSMALib.spatial import Calibration, SpatialFlow, SpatialFlowConfig
    from SpatialMSMALib.synthesis import SubjectConfig

    folder = tmp_path_factory.mktemp("add_normative")
    sizes = CohortSizes(n_train=3, n_val=2, n_test_healthy=0, n_test_lesioned=0,
                        n_loao_healthy=0, n_loao_lesioned=0)
    manifest = make_benchmark(folder / "cohort", sizes=sizes, seed=5, progress=False,
                              subject_config=SubjectConfig(spacing_mm=4.0))
    torch.manual_seed(0)
    flow = SpatialFlow(SpatialFlowConfig(num_features=4, flow_layers=1, hidden=8,
                                         position_frequencies=1, global_features=0,
                                         intensity_features=True, score_features=False)).eval()
    flow.set_feature_statistics(torch.randn(64, 2))
    model = AnomalyModel(ScoreUNet(3, 2, (4, 8), 8).eval(),
                         GeometricNoiseSchedule(0.05, 1.0, 4), spacing_mm=4.0,
                         shape=(48, 56, 48))
    model.spatial = flow
    model.calibration = Calibration([1e-6, 1.0], [1.0, 0.0], smoothing_mm=2.0,
                                    default_fpr=0.01, grow_rate_factor=3.0)
    path = model.save(folder / "intensity.pt")
    return {"manifest": manifest, "model": path, "folder": folder}


def _train_and_val_scans(setup):
    from SpatialMSMALib.dataset import manifest_scans, model_space

    rows = manifest_scans(setup["manifest"], ("train", "val"))
    return {name: model_space(rows[name], setup["folder"] / "work" / "cache", 4.0,
                              progress=False) for name in ("train", "val")}


def test_add_then_reuse_normative(intensity_model_and_cohort, capsys):
    import add_normative

    from SpatialMSMALib.detection import component_heat_maps
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.normative import NormativeContrast, NormativeContrastConfig
    from SpatialMSMALib.scan_standardization import scan_statistics
    from SpatialMSMALib.spatial import scored_region

    setup = intensity_model_and_cohort
    folder = setup["folder"]
    common = ["--manifest", str(setup["manifest"]), "--work", str(folder / "work"),
              "--normative-blob-mm", "4,8", "--min-component-ml", "0"]
    added_path = folder / "added.pt"
    assert add_normative.main(["--model", str(setup["model"]), "--out", str(added_path),
                               *common]) == 0
    source, added = AnomalyModel.load(setup["model"]), AnomalyModel.load(added_path)
    # the flow is copied unchanged, the post-processing settings are kept
    flow_before, flow_after = source.spatial.state_dict(), added.spatial.state_dict()
    assert all(torch.equal(flow_before[k], flow_after[k]) for k in flow_before)
    assert added.calibration.grow_rate_factor == 3.0 and added.calibration.default_fpr == 0.01
    assert set(added.component_calibrations) == {"flow", "normative"}
    # the normative model is the one fitted on the cohort's three training scans
    scans = _train_and_val_scans(setup)
    assert added.provenance["normative_contrast"]["train_ids"] == [s.id for s in scans["train"]]
    direct = NormativeContrast.fit(((s.image, s.brain_mask) for s in scans["train"]),
                                   NormativeContrastConfig(sigmas_vox=(1.0, 2.0)))
    assert added.normative.config.sigmas_vox == (1.0, 2.0)  # 4 and 8 mm on the 4 mm grid
    assert np.array_equal(added.normative.valid, direct.valid)
    assert np.allclose(added.normative.mean, direct.mean, atol=1e-6)

    # a second add is refused: the model already has one, and nothing is written
    refused = folder / "refused.pt"
    assert add_normative.main(["--model", str(added_path), "--out", str(refused), *common]) == 2
    assert "already has a normative contrast model" in capsys.readouterr().err
    assert not refused.exists()
    # --reuse-normative on a model without one is refused as well
    assert add_normative.main(["--model", str(setup["model"]), "--out", str(refused),
                               "--reuse-normative", *common]) == 2
    assert "has no normative contrast model to reuse" in capsys.readouterr().err
    assert not refused.exists()

    # --reuse-normative with a ratio rule for the normative map: the normative model is kept
    # as it is, and the rule's reference median is the median over the validation scans of
    # their raw normative maps' medians
    reused_path = folder / "reused.pt"
    assert add_normative.main(["--model", str(added_path), "--out", str(reused_path),
                               "--reuse-normative", "--scan-standardization", "none,ratio",
                               *common]) == 0
    reused = AnomalyModel.load(reused_path)
    assert np.array_equal(reused.normative.mean, added.normative.mean)
    assert np.array_equal(reused.normative.precision, added.normative.precision)
    assert set(reused.scan_standardization) == {"normative"}
    recalibrated = reused.provenance["normative_contrast"]["recalibrated"]
    assert recalibrated["n_val"] == 2 and recalibrated["scan_standardization"] == "none,ratio"
    no_norms = np.zeros((0, *added.shape), np.float32)
    medians, standardised = [], []
    for scan in scans["val"]:
        region = scored_region(scan.brain_mask, added.calibration.rim_mm, 4.0)
        _, normative_map = component_heat_maps(added, scan.image, scan.brain_mask, no_norms)
        medians.append(scan_statistics(normative_map, region)["median"])
        _, moved = component_heat_maps(reused, scan.image, scan.brain_mask, no_norms)
        standardised.append(scan_statistics(moved, region)["median"])
    rule = reused.scan_standardization["normative"]
    assert rule.rule == "ratio" and rule.n_scans == 2
    assert rule.reference_median == pytest.approx(np.median(medians), rel=1e-5)
    assert standardised == pytest.approx([rule.reference_median] * 2, rel=1e-4)
    assert medians[0] != pytest.approx(medians[1], rel=1e-3)  # the rule had work to do
    # the normative map's calibration is that of the standardised maps, the flow's is not
    assert (reused.component_calibrations["flow"].scores
            == pytest.approx(added.component_calibrations["flow"].scores))
    assert (reused.component_calibrations["normative"].scores
            != pytest.approx(added.component_calibrations["normative"].scores))
    assert dataclasses.asdict(reused.spatial.config) == dataclasses.asdict(added.spatial.config)
