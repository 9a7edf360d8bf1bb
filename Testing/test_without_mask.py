"""benchmarks/without_mask.py: one scan through detection with and without its brain mask,
scored inside the true brain; the summary counts refusals and skips their scans."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.usefixtures("reuse_registrations")
def test_a_scan_is_detected_with_and_without_its_mask(detection_setup):
    from without_mask import scan_pair

    from SpatialMSMALib.detection import NO_BRAIN_MASK_WARNING
    from SpatialMSMALib.io import load_volume

    paths = detection_setup["paths"]
    files = {"t1": paths["t1"], "t2": paths["t2"], "brain_mask": paths["brain_mask"],
             "lesion_mask": paths["lesion"]}
    model = detection_setup["model"]
    pair = scan_pair({"with_mask": model, "without_mask": model}, files, "cpu")
    true_ml = float((load_volume(paths["brain_mask"]).data > 0).sum()) * 8 / 1000
    given, atlas = pair["with_mask"], pair["without_mask"]
    # with its mask the detection's brain is that mask, and nothing outside it is flagged
    assert given["brain_mask_ml"] == pytest.approx(true_ml)
    assert given["flagged_outside_true_brain_ml"] == 0
    assert NO_BRAIN_MASK_WARNING not in given["warnings"]
    # without it the atlas mask is used, and the report says so
    assert atlas["brain_mask_ml"] != pytest.approx(true_ml, rel=1e-3)
    assert atlas["warnings"][-1] == NO_BRAIN_MASK_WARNING
    for record in (given, atlas):
        assert record["n_truth"] == 1 and not record["healthy"]
        assert 0 <= record["tpr"] <= 1 and record["flagged_ml"] >= 0


def test_summaries_leave_out_scans_refused_in_either_variant():
    from without_mask import summaries

    from SpatialMSMALib.metrics import evaluate_case

    truth = np.zeros((20, 20, 20), bool)
    truth[2:10, 2:10, 2:10] = True  # 4.1 mL at 2 mm
    brain = np.ones_like(truth)

    def case(flagged_voxels, lesioned=False):
        pred = np.zeros_like(truth)
        pred[12:20, 12:20, 12:20] = True
        pred.flat[np.flatnonzero(pred)[flagged_voxels:]] = False
        if lesioned:
            pred[3:5, 3:5, 3:5] = True  # touches the lesion
        return evaluate_case(pred, truth if lesioned else np.zeros_like(truth),
                             (2.0, 2.0, 2.0), pred.astype(np.float32), brain)

    cases = [{"with_mask": case(0), "without_mask": case(125)},
             {"with_mask": case(125), "without_mask": {"refused": "NCC 0.4 < 0.5"}},
             {"with_mask": case(250), "without_mask": case(375)},
             {"with_mask": case(0, True), "without_mask": case(125, True)}]
    result = summaries(cases)
    assert result["with_mask"]["n_scans"] == result["without_mask"]["n_scans"] == 3
    # the lesioned scan: found in both; the second variant adds a false component
    assert result["with_mask"]["pooled_tpr_lesions_ge_0.5ml"] == 1.0
    assert result["with_mask"]["lesioned"]["pooled_ppv"] == 1.0
    assert result["without_mask"]["lesioned"]["pooled_ppv"] == 0.5
    assert result["without_mask"]["n_refused"] == 1 and result["with_mask"]["n_refused"] == 0
    # healthy scans 1 and 3 (scan 2 refused without its mask): 0 and 2 mL, 1 and 3 mL
    assert result["with_mask"]["healthy"]["median_flagged_ml"] == 1.0
    assert result["without_mask"]["healthy"]["median_flagged_ml"] == 2.0
