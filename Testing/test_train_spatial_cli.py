"""training/train_spatial.py: option errors are reported before any work."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_spatial.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def _assert_refused_before_any_work(tmp_path, message, *options):
    out = tmp_path / "model.pt"
    result = _run("--data-dir", tmp_path, "--out", out, *options)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "model.pt.work").exists()


def test_a_flow_without_inputs_is_refused_before_any_work(tmp_path):
    _assert_refused_before_any_work(
        tmp_path, "--flow-score-features false needs --flow-intensity-features true",
        "--flow-score-features", "false")


def test_a_boolean_option_rejects_other_words(tmp_path):
    result = _run("--data-dir", tmp_path, "--out", tmp_path / "m.pt",
                  "--flow-intensity-features", "maybe")
    assert result.returncode == 2
    assert "--flow-intensity-features" in result.stderr
    assert "expected true or false" in result.stderr


def test_a_malformed_level_selection_is_refused_before_any_work(tmp_path):
    _assert_refused_before_any_work(tmp_path, "--flow-score-levels: score levels 'low'",
                                    "--flow-score-levels", "low")


def test_an_invalid_demons_setting_is_refused_before_any_work(tmp_path):
    _assert_refused_before_any_work(tmp_path, "--demons-iterations / --demons-smoothing-vox",
                                    "--demons-iterations", "-3")
    _assert_refused_before_any_work(tmp_path, "smoothing_vox > 0",
                                    "--demons-iterations", "20", "--demons-smoothing-vox", "0")


def test_add_normative_refuses_an_existing_output_and_a_score_norm_flow(detection_setup,
                                                                        tmp_path):
    script = ROOT / "training" / "add_normative.py"
    taken = tmp_path / "taken.pt"
    taken.write_bytes(b"keep me")
    common = ["--model", str(detection_setup["path"]), "--data-dir", str(tmp_path),
              "--work", str(tmp_path / "work")]
    result = subprocess.run([sys.executable, str(script), *common, "--out", str(taken)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "taken.pt' exists" in result.stderr
    assert taken.read_bytes() == b"keep me"
    # the test model's flow reads score norms: it needs retraining, not this script
    result = subprocess.run([sys.executable, str(script), *common,
                             "--out", str(tmp_path / "new.pt")], capture_output=True, text=True)
    assert result.returncode == 2 and "reads score norms" in result.stderr
    assert "train_spatial.py --normative-contrast true" in result.stderr
    assert not (tmp_path / "new.pt").exists() and not (tmp_path / "work").exists()
