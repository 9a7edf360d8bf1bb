"""Bad command-line input is refused before any work, with a message naming the problem:
an output path that cannot be a folder (or a file), a device name torch does not know, a
threshold that is not a number. Each case here returns within a second or two, because the
check comes before loading a model or a scan."""

import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from SpatialMSMALib import io as volume_io
from SpatialMSMALib.cli import build_parser, main
from SpatialMSMALib.detection import resolve_threshold
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.inference import select_device
from SpatialMSMALib.io import check_output_file, check_output_folder
from SpatialMSMALib.registry import REGISTRY
from SpatialMSMALib.spatial import Calibration
from SpatialMSMALib.training_utils import training_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    """An existing plain file (where a folder is expected) and a stand-in scan path."""
    a_file = tmp_path / "results.txt"
    a_file.write_text("a user's notes\n")
    scan = tmp_path / "t1.nii.gz"
    scan.write_bytes(b"not read: the output check comes first")
    return types.SimpleNamespace(a_file=a_file, scan=scan, root=tmp_path)


def test_output_folder_checks(files, monkeypatch):
    with pytest.raises(InputError, match=r"'.*results\.txt' is an existing file, not a folder"):
        check_output_folder(files.a_file)
    with pytest.raises(InputError, match=r"cannot be made: '.*results\.txt' is a file"):
        check_output_folder(files.a_file / "out" / "deeper")
    # a folder that does not exist yet is fine, and nothing is created
    assert check_output_folder(files.root / "new" / "out") == files.root / "new" / "out"
    assert not (files.root / "new").exists()
    with pytest.raises(InputError, match=r"output file '.*' is an existing folder"):
        check_output_file(files.root)
    with pytest.raises(InputError, match=r"scores\.csv' cannot be written: output folder "
                                         r"'.*results\.txt' is an existing file"):
        check_output_file(files.a_file / "scores.csv")
    # the deepest existing folder must be writable (root ignores permissions, so the
    # permission answer is stubbed: only the decision is under test)
    monkeypatch.setattr(volume_io.os, "access", lambda path, mode: False)
    with pytest.raises(InputError, match=r"no permission to write in '.*'"):
        check_output_folder(files.root / "new")


@pytest.mark.parametrize("command", [
    ["detect", "--t1", "{scan}", "--out", "{a_file}"],
    ["demo", "--out", "{a_file}"],
    ["preprocess", "--t1", "{scan}", "--out", "{a_file}"],
    ["make-benchmark", "--out", "{a_file}", "--spacing", "4"],
    ["seg-qc", "--labels", "{scan}", "--image", "{scan}", "--out", "{a_file}"],
    ["gnsm", "fit", "{scan}", "--out", "{root}"],
    ["gnsm", "score", "{scan}", "{scan}", "--out", "{root}"],
])
def test_commands_refuse_an_unusable_output_before_any_work(files, command, capsys):
    argv = [a.format(scan=files.scan, a_file=files.a_file, root=files.root) for a in command]
    start = time.perf_counter()
    assert main(argv) == 2
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert "\nerror: " in "\n" + err.replace("\r", "\n") and "Traceback" not in err
    assert ("is an existing file, not a folder" in err and str(files.a_file) in err) or (
        "is an existing folder, not a file" in err and str(files.root) in err), err
    # refused before a model, a template or a scan was loaded (each takes seconds)
    assert seconds < 5, f"{argv[0]} took {seconds:.1f} s to refuse its output"
    assert files.a_file.read_text() == "a user's notes\n"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda0", "tpu"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(InputError, match=rf"--device must be auto, cpu, cuda or cuda:N, "
                                         rf"not '{name}'"):
        select_device(name)
    with pytest.raises(InputError, match="--device must be"):
        training_device(name)


def test_device_choices_that_work_here():
    assert select_device("cpu").type == "cpu"
    assert select_device(" CPU ").type == "cpu"
    assert training_device("cpu") == "cpu"
    if not __import__("torch").cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device is available"):
            select_device("cuda:0")
        with pytest.raises(InputError, match="no CUDA device is available"):
            training_device("cuda")


def test_detect_refuses_a_bad_device_before_any_work(files, capsys):
    assert main(["detect", "--t1", str(files.scan), "--out", str(files.root / "o"),
                 "--device", "gpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N, not 'gpu'" in capsys.readouterr().err
    assert not (files.root / "o").exists()


def test_training_scripts_refuse_cuda_on_a_machine_without_it(files, capsys, monkeypatch):
    """``--device cuda`` where torch finds no GPU: a one-line error, not torch's traceback
    from ``torch.cuda.set_device`` (the machine is made GPU-less for the test)."""
    sys.path.insert(0, str(ROOT / "training"))
    import torch
    import train_score
    import train_spatial

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for script in (train_spatial, train_score):
        out = files.root / f"{script.__name__}.pt"
        code = script.main(["--data-dir", str(files.root), "--out", str(out),
                            "--device", "cuda"])
        err = capsys.readouterr().err
        assert code == 2 and "--device cuda was asked for but no CUDA device" in err, err
        assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf")])
def test_threshold_must_be_finite(threshold):
    rng = np.random.default_rng(0)
    model = types.SimpleNamespace(calibration=Calibration.from_healthy(
        [rng.normal(size=20_000)], default_fpr=0.01))
    with pytest.raises(InputError, match="threshold must be a finite number"):
        resolve_threshold(model, threshold=threshold)
    value, rate = resolve_threshold(model, threshold=2.0)
    assert value == 2.0 and 0.01 < rate < 0.05  # P(N(0,1) > 2) = 0.023


def test_detect_help_states_the_bundled_models_default_rates(capsys):
    entries = json.loads(REGISTRY.read_text())["models"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["detect", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    rates = [(e["channels"], e["calibration"], e.get("brain_masks", "given"))
             for e in entries if "calibration" in e]
    assert rates, "the registry lists no detection model"
    for channels, calibration, masks in rates:
        name = " + ".join(channels) + (" (no mask)" if masks == "atlas" else "")
        assert f"{name}: {calibration['default_voxel_fpr']:g}" in help_text
    two_channel = next(c for ch, c, masks in rates if ch == ["T1", "T2"] and masks == "given")
    assert (f"T1 + T2: {two_channel['default_voxel_fpr']:g}, components grown to "
            f"{two_channel['grow_rate_factor']:g}x that rate") in help_text


@pytest.mark.parametrize("rows, message", [
    ("id,t1\na,{scan}\na,{scan}\n", r"line 3: id 'a' repeats line 2; each scan needs its own id"),
    ("id,t1\n../up,{scan}\n", r"line 2: id '\.\./up' must be a plain folder name"),
    ("id,t1\nsub/dir,{scan}\n", r"line 2: id 'sub/dir' must be a plain folder name"),
    ("id,t1\n,{scan}\n", r"line 2: id '' must be a plain folder name"),
    ("id,t1\n..,{scan}\n", r"line 2: id '\.\.' must be a plain folder name"),
    ("id,t1\na,{scan}\nb,\n", r"line 3: scan 'b' has no t1"),
    ("name,t1\na,{scan}\n", r"needs a header with at least 'id' and 't1'"),
])
def test_detect_list_rows_are_checked_before_any_work(files, rows, message, capsys):
    scans = files.root / "scans.csv"
    scans.write_text(rows.format(scan=files.scan))
    assert main(["detect", "--list", str(scans), "--out", str(files.root / "out")]) == 2
    err = capsys.readouterr().err
    assert str(scans) in err or "header" in err
    assert __import__("re").search(message, err), err
    assert not (files.root / "out").exists()


def test_detect_list_and_single_scan_flags_are_exclusive(files, capsys):
    scans = files.root / "scans.csv"
    scans.write_text(f"id,t1\na,{files.scan}\n")
    assert main(["detect", "--list", str(scans), "--t1", str(files.scan), "--out",
                 str(files.root / "out")]) == 2
    assert "either with --list or with --t1, not both" in capsys.readouterr().err


def test_detect_list_rows_split_across_ranks(files, monkeypatch):
    """Every row is checked on every rank (so all ranks refuse alike), then rank r of
    WORLD_SIZE w takes rows r, r + w, ...; together the ranks take each row once."""
    from SpatialMSMALib.cli import _detect_rows

    scans = files.root / "scans.csv"
    scans.write_text("id,t1,t2\n" + "".join(f"s{k},t1_{k}.nii.gz,\n" for k in range(5)))
    args = build_parser().parse_args(["detect", "--list", str(scans), "--out", "o"])
    monkeypatch.setenv("WORLD_SIZE", "3")
    taken = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        rows = _detect_rows(args)
        assert [r["id"] for r in rows] == [f"s{k}" for k in range(rank, 5, 3)]
        assert all(r["t1"] == files.root / f"t1_{r['id'][1:]}.nii.gz" and r["t2"] is None
                   for r in rows)
        taken += [r["id"] for r in rows]
    assert sorted(taken) == [f"s{k}" for k in range(5)]


def test_evaluate_refuses_an_image_given_as_a_label_volume(files, capsys):
    from SpatialMSMALib.io import save_volume

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = np.zeros((8, 8, 8), np.float32)
    labels[2:4, 2:4, 2:4] = 1
    heat = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    truth = save_volume(files.root / "truth.nii.gz", labels, affine)
    heat_path = save_volume(files.root / "heat.nii.gz", heat, affine)
    for pred, truth_path, name in ((heat_path, truth, "prediction"),
                                   (truth, heat_path, "truth mask")):
        assert main(["evaluate", "--pred", str(pred), "--truth", str(truth_path)]) == 2
        err = capsys.readouterr().err
        assert f"{name} '{heat_path}' holds non-integer values" in err, err
    # label volumes stored as floats (whole numbers) are fine
    assert main(["evaluate", "--pred", str(truth), "--truth", str(truth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dice"] == 1.0


def test_training_scripts_refuse_an_unusable_out_before_any_work(files, capsys):
    sys.path.insert(0, str(ROOT / "training"))
    import add_normative
    import fit_msma
    import train_score
    import train_spatial

    under_a_file = files.a_file / "model"
    runs = [
        (train_spatial, ["--data-dir", str(files.root), "--out", str(under_a_file),
                         "--score-checkpoint", str(files.scan)]),
        (train_score, ["--data-dir", str(files.root), "--out", str(under_a_file)]),
        (fit_msma, ["--score-checkpoint", str(files.scan), "--data-dir", str(files.root),
                    "--out", str(under_a_file)]),
        (add_normative, ["--model", str(files.scan), "--manifest", str(files.root), "--work",
                         str(files.root / "w"),
                         "--out", str(files.root)]),
    ]
    for script, argv in runs:
        assert script.main(argv) == 2, script.__name__
        err = capsys.readouterr().err
        assert "--out '" in err and ("results.txt" in err or "existing folder" in err), err
        assert "Traceback" not in err
    assert files.a_file.read_text() == "a user's notes\n"


def test_benchmark_scripts_refuse_an_unusable_out_before_their_work(files, capsys):
    """Every benchmark script checks --out through cohort_args.refuse_existing_output before
    its minutes of work (without_mask.py runs about 20), not when it writes at the end."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cohort_args import refuse_existing_output
    from without_mask import main as without_mask_main

    for out, message in ((files.a_file / "r.json", "is an existing file, not a folder"),
                         (files.root, "is an existing folder, not a file"),
                         (files.a_file, "exists; pass --overwrite")):
        with pytest.raises(InputError, match=message):
            refuse_existing_output(argparse.Namespace(out=out, overwrite=False))
    refuse_existing_output(argparse.Namespace(out=files.a_file, overwrite=True))  # allowed
    with pytest.raises(SystemExit) as exit_info:
        without_mask_main(["--manifest", str(files.root), "--out",
                           str(files.a_file / "r.json"), "--device", "gpu"])
    assert exit_info.value.code == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert files.a_file.read_text() == "a user's notes\n"
