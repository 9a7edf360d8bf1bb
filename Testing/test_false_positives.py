"""benchmarks/false_positives.py: each false component's driver, tissue and depth, and the
summary by each; it and benchmarks/lesion_evidence.py refuse to replace an output."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_components_are_described_by_volume_driver_tissue_and_depth():
    from false_positives import describe_components

    shape = (40, 40, 40)
    brain = np.zeros(shape, bool)
    brain[5:35, 5:35, 5:35] = True
    tissue = np.where(brain, 3, 0)  # white matter inside, nothing outside
    tissue[5:35, 5:35, 5:10] = 2  # a grey-matter slab along one face
    labels = np.zeros(shape, int)
    labels[18:22, 18:22, 18:22] = 1  # deep, in white matter: 64 voxels
    labels[10:14, 10:14, 6:10] = 2  # against the grey-matter face: 64 voxels
    fused = np.zeros(shape, np.float32)
    fused[labels == 1] = 4.0
    fused[labels == 2] = 3.0
    flow_part = np.zeros(shape, np.float32)
    flow_part[labels == 1] = 3.0  # the flow gives 3 of the 4
    flow_part[labels == 2] = 0.5  # the normative map most of the second
    records = describe_components(labels, 2, fused, flow_part, tissue, brain, (2.0, 2.0, 2.0))
    assert [r["volume_ml"] for r in records] == [64 * 8 / 1000] * 2
    assert records[0]["flow_share"] == pytest.approx(0.75)
    assert records[1]["flow_share"] == pytest.approx(0.5 / 3)
    assert records[0]["tissue"] == {"csf": 0.0, "gm": 0.0, "wm": 1.0}
    assert records[1]["tissue"] == {"csf": 0.0, "gm": 1.0, "wm": 0.0}
    assert records[0]["peak"] == 4.0
    # depth: the first outside voxels are at indices 4 and 35, so along each axis indices 18
    # and 21 lie 14 voxels deep and 19, 20 lie 15; only the 8 voxels with every index 19 or
    # 20 are 15 voxels deep, the other 56 are 14: median 14 voxels of 2 mm
    assert records[0]["depth_mm"] == pytest.approx(28.0)
    # z index 6..9 next to the face: 2..5 voxels, median 7 mm
    assert records[1]["depth_mm"] == pytest.approx(7.0)
    # a flow-only model: the flow is the whole of it
    alone = describe_components(labels, 2, fused, None, tissue, brain, (2.0, 2.0, 2.0))
    assert [r["flow_share"] for r in alone] == [1.0, 1.0]


def test_summary_splits_the_flagged_volume_by_driver_tissue_and_depth():
    from false_positives import SHALLOW_MM, summarise

    def component(ml, share, tissue, depth):
        fractions = {"csf": 0.0, "gm": 0.0, "wm": 0.0}
        fractions.update(tissue)
        return {"volume_ml": ml, "flow_share": share, "tissue": fractions, "depth_mm": depth}

    components = [component(1.0, 0.9, {"gm": 0.7, "csf": 0.3}, SHALLOW_MM - 1),
                  component(2.0, 0.2, {"csf": 0.6, "gm": 0.4}, SHALLOW_MM + 5),
                  component(0.5, 0.5, {"wm": 1.0}, SHALLOW_MM)]
    summary = summarise(components, n_scans=2)
    assert summary["n_components"] == 3 and summary["components_per_scan"] == 1.5
    assert summary["flagged_ml"] == 3.5 and summary["flagged_ml_per_scan"] == 1.75
    assert summary["by_driver_ml"] == {"flow": 1.5, "normative": 2.0}
    assert summary["by_majority_tissue_ml"] == {"csf": 2.0, "gm": 1.0, "wm": 0.5}
    assert summary["by_depth_ml"] == {f"shallow (< {SHALLOW_MM:g} mm)": 1.0, "deep": 2.5}


@pytest.mark.parametrize("script", ["false_positives.py", "lesion_evidence.py"])
def test_the_cohort_scripts_refuse_an_existing_output(tmp_path, script):
    out = tmp_path / "out.json"
    out.write_text("keep")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script),
                             "--manifest", str(tmp_path), "--cache", str(tmp_path), "--out",
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert "Traceback" not in result.stderr and out.read_text() == "keep"
