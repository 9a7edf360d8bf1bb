"""benchmarks/lesion_evidence.py: why each lesion is found or missed."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from lesion_evidence import lesion_records, summarise  # noqa: E402

from SpatialMSMALib.spatial import label_anomalies  # noqa: E402


def _cube(volume, corner, side, value=True):
    i, j, k = corner
    volume[i:i + side, j:j + side, k:k + side] = value


def test_each_lesion_gets_the_first_labelling_rule_it_fails():
    """Four 2 mm lesions of 8 x 8 x 8 mm (0.512 mL) and one of 0.216 mL: strong evidence,
    moderate evidence everywhere (no voxel at the peak threshold), a strong 2-voxel spot in
    a weak lesion, no evidence, and a strong but small lesion (not counted)."""
    shape, spacing = (40, 40, 40), (2.0, 2.0, 2.0)
    truth = np.zeros(shape, bool)
    heat = np.zeros(shape, np.float32)
    flow = np.zeros(shape, np.float32)
    brain = np.ones(shape, bool)
    for corner in ((2, 2, 2), (2, 20, 2), (20, 2, 2), (20, 20, 2), (30, 30, 30)):
        _cube(truth, corner, 4)
    truth[30:34, 30:34, 30:34] = False
    _cube(truth, (30, 30, 30), 3)  # 27 voxels = 0.216 mL: under the 0.5 mL limit
    _cube(heat, (2, 2, 2), 4, 6.0)  # detected
    _cube(flow, (2, 2, 2), 4, 2.5)
    _cube(heat, (2, 20, 2), 4, 4.0)  # above the extent (3.5), below the peak (4.5)
    heat[20, 2, 2] = heat[20, 2, 3] = 5.0  # a 0.016 mL spot at the peak threshold
    _cube(heat, (30, 30, 30), 3, 9.0)
    records = lesion_records(truth, heat, flow, brain, extent=3.5, peak_threshold=4.5,
                             min_component_ml=0.3, spacing_mm=spacing)
    assert [r["reason"] for r in records] == [
        "detected", "peak below the peak threshold", "component under the minimum size",
        "below the extent threshold"]
    first, moderate, spot, empty = records
    assert first["volume_ml"] == pytest.approx(0.512) and first["peak"] == 6.0
    assert first["flow_peak"] == 2.5 and first["normative_peak"] == 3.5
    assert first["extent_ml"] == pytest.approx(0.512) == first["component_ml"]
    assert moderate["component_peak"] == 4.0 and moderate["extent_ml"] == pytest.approx(0.512)
    assert spot["component_ml"] == pytest.approx(0.016) and spot["component_peak"] == 5.0
    assert empty["component_ml"] is None and empty["peak"] == 0.0
    # "detected" is what the detector's labelling keeps (any overlap with a kept component)
    labels, _ = label_anomalies(heat, brain, 3.5, spacing, 0.3, 4.5)
    lesion_ids = [(2, 2, 2), (2, 20, 2), (20, 2, 2), (20, 20, 2)]
    kept = [bool(labels[i:i + 4, j:j + 4, k:k + 4].any()) for i, j, k in lesion_ids]
    assert kept == [r["reason"] == "detected" for r in records]
    # a flow-only model: the flow's peak is the heat map's, no normative part
    alone = lesion_records(truth, heat, None, brain, 3.5, 4.5, 0.3, spacing)
    assert alone[0]["flow_peak"] == 6.0 and alone[0]["normative_peak"] is None
    summary = summarise(records)
    assert summary["n"] == 4 and summary["detected"] == {"n": 1, "peak_range": [6.0, 6.0]}
    assert summary["below the extent threshold"]["n"] == 1

