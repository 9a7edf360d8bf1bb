"""benchmarks/missed_lesions.py: each lesion's surroundings and contrast, and the summary."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _cube(shape, corner, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + size) for c in corner)] = True
    return mask


def test_lesion_context_measures_the_shell_and_matches_the_manifest_lesion():
    from missed_lesions import lesion_context
    from scipy import ndimage

    shape = (30, 30, 30)
    tissue = np.full(shape, 3)  # white matter
    tissue[:, :, 20:] = 2  # grey matter from z = 20 on
    tissue[0] = 0  # background outside the head
    deep = _cube(shape, (5, 5, 5), 4)  # its 2-voxel shell stays inside white matter
    cortical = _cube(shape, (15, 15, 16), 4)  # z 16-19: the shell reaches z 20-21
    lesions = [{"centroid_voxel": [6.5, 6.5, 6.5], "t1_factor": 0.95, "t2_factor": 1.1},
               {"centroid_voxel": [16.5, 16.5, 17.5], "t1_factor": 0.7, "t2_factor": 1.6}]
    records = lesion_context(deep | cortical, tissue, lesions, (2.0, 2.0, 2.0))
    assert [r["volume_mm3"] for r in records] == [64 * 8.0, 64 * 8.0]
    assert records[0]["shell_non_wm"] == 0.0
    # the shell: 2-voxel 6-connected growth minus the cube; its z >= 20 part is grey matter
    grown = ndimage.binary_dilation(cortical, iterations=2) & ~cortical
    expected = (tissue[grown] == 2).mean()
    assert records[1]["shell_non_wm"] == pytest.approx(expected) and expected > 0.1
    assert records[0]["faint"] is True and records[1]["faint"] is False
    assert records[1]["t2_factor"] == 1.6
    # a component holding no manifest centroid keeps no factors
    unmatched = lesion_context(deep, tissue, lesions[1:], (2.0, 2.0, 2.0))
    assert unmatched[0]["faint"] is None and unmatched[0]["t1_factor"] is None


def test_summary_counts_misses_by_faintness_and_surroundings():
    from missed_lesions import summarise

    rows = [
        {"detected": True, "faint": False, "shell_non_wm": 0.0},
        {"detected": False, "faint": False, "shell_non_wm": 0.6},
        {"detected": False, "faint": True, "shell_non_wm": 0.1},
        {"detected": False, "faint": True, "shell_non_wm": 0.5},
        {"detected": False, "faint": None, "shell_non_wm": 0.0},
    ]
    summary = summarise(rows)
    assert summary["all"] == {"n": 5, "detected": 1, "tpr": 0.2}
    assert summary["groups"]["clear, inside WM"] == {"n": 1, "detected": 1, "tpr": 1.0}
    assert summary["groups"]["faint, next to GM/CSF"]["n"] == 1
    assert summary["missed"] == {"n": 4, "faint": 2, "next_to_gm_csf": 2, "either": 3,
                                 "unmatched": 1}


def test_the_script_refuses_an_existing_output_and_a_foreign_file(tmp_path):
    script = ROOT / "benchmarks" / "missed_lesions.py"
    out = tmp_path / "out.json"
    out.write_text("{}")
    result = subprocess.run([sys.executable, str(script), "--result", str(out), "--manifest",
                             str(out), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"something": 1}))
    result = subprocess.run([sys.executable, str(script), "--result", str(foreign),
                             "--manifest", str(foreign)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "not a spatial_3d.py result and a benchmark manifest" in result.stderr
    assert "Traceback" not in result.stderr and out.read_text() == "{}"


def test_the_script_end_to_end_and_a_result_from_another_cohort(tmp_path, capsys):
    from missed_lesions import main

    from SpatialMSMALib.io import save_volume

    shape = (20, 20, 20)
    tissue = np.full(shape, 3, np.uint8)
    lesion = _cube(shape, (5, 5, 5), 5)  # 125 voxels of 8 mm^3: 1 mL
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_volume(tmp_path / "s_lesionmask.nii.gz", lesion.astype(np.uint8), affine)
    save_volume(tmp_path / "s_tissue.nii.gz", tissue, affine)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "spatial-msma-benchmark/1", "subjects": [{
        "id": "s", "lesion_mask": "s_lesionmask.nii.gz", "tissue": "s_tissue.nii.gz",
        "lesions": [{"centroid_voxel": [7, 7, 7], "t1_factor": 0.7, "t2_factor": 1.5}]}]}))
    case = {"id": "s", "healthy": False, "truth_sizes_mm3": [1000.0], "truth_detected": [True]}
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"splits": {"test": {"cases": [case]}}}))
    out = tmp_path / "out.json"
    assert main(["--result", str(result), "--manifest", str(manifest), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["splits"]["test"]["lesions"]
    assert rows == [{"id": "s", "detected": True, "volume_mm3": 1000.0, "shell_non_wm": 0.0,
                     "t1_factor": 0.7, "t2_factor": 1.5, "faint": False}]
    # a result whose truth components differ (another cohort's) is refused, naming the case
    result.write_text(json.dumps({"splits": {"test": {"cases": [
        dict(case, truth_sizes_mm3=[1000.0, 64.0], truth_detected=[True, False])]}}}))
    assert main(["--result", str(result), "--manifest", str(manifest)]) == 2
    assert "case 's': the truth components differ" in capsys.readouterr().err
