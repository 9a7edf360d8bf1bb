"""What a browser client may read and upload, and the CLI-process helpers both GUIs share."""

import os

import pytest

from SpatialMSMALib.errors import InputError
from SpatialMSMALib.slicer_logic import cli_error_message, detect_command, parse_cli_progress
from SpatialMSMALib.viewer.files import (
    AccessError,
    ScanSources,
    UploadBatch,
    check_bind,
    is_loopback,
    safe_upload_name,
)


@pytest.fixture
def sources(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("sub/t1.nii.gz", "t2.nrrd", "notes.txt", "sub/mask.nii"):
        (data / name).write_bytes(b"x")
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes(b"secret")
    (data / "escape.nii.gz").symlink_to(outside)
    (data / "sub" / "inner_link.nii.gz").symlink_to(data / "t2.nrrd")
    cli_file = tmp_path / "given_t1.nii.gz"
    cli_file.write_bytes(b"y")
    s = ScanSources(data, tmp_path / "uploads", upload_limit_bytes=100,
                    extra_files=[cli_file])
    (s.upload_dir / "up_t1.nii.gz").write_bytes(b"z")
    return s


def test_choices_list_scans_only_and_never_links_that_leave(sources):
    values = [c["value"] for c in sources.choices()]
    assert values == ["data:sub/inner_link.nii.gz", "data:sub/mask.nii", "data:sub/t1.nii.gz",
                      "data:t2.nrrd", "file:0", "upload:up_t1.nii.gz"]


def test_resolve_returns_the_offered_files(sources, tmp_path):
    assert sources.resolve("data:sub/t1.nii.gz") == (tmp_path / "data/sub/t1.nii.gz").resolve()
    assert sources.resolve("upload:up_t1.nii.gz").read_bytes() == b"z"
    assert sources.resolve("file:0").name == "given_t1.nii.gz"
    assert sources.resolve(sources.choice_for(sources.extra_files[0])).read_bytes() == b"y"


@pytest.mark.parametrize("choice", [
    "data:../../etc/passwd", "data:../outside.nii.gz", "data:/etc/passwd",
    "data:sub/../../outside.nii.gz", "data:escape.nii.gz", "data:notes.txt",
    "data:C:\\Windows\\system.ini", "data:..\\outside.nii.gz", "upload:../data/t2.nrrd",
    "upload:/etc/passwd", "file:1", "file:-1", "file:../0", "/etc/passwd", "etc:passwd",
    "data:", "data:sub", "data:missing.nii.gz", "data:t2.nrrd\x00.txt"])
def test_resolve_refuses_everything_else(sources, choice):
    with pytest.raises(AccessError):
        sources.resolve(choice)


def test_no_data_folder_means_no_data_choices(tmp_path):
    s = ScanSources(None, tmp_path / "up")
    assert s.choices() == []
    with pytest.raises(AccessError):
        s.resolve("data:x.nii.gz")
    with pytest.raises(InputError, match="does not exist"):
        ScanSources(tmp_path / "nope", tmp_path / "up")


@pytest.mark.parametrize("name,expected", [
    ("scan_T1.nii.gz", "scan_T1.nii.gz"), ("../../etc/x.nii", "x.nii"),
    ("C:\\Users\\me\\brain scan.nrrd", "brain_scan.nrrd"), ("a/b/ü.nii.gz", "_.nii.gz")])
def test_upload_names_are_plain_base_names(name, expected):
    assert safe_upload_name(name) == expected


@pytest.mark.parametrize("name", ["passwd", ".hidden.nii.gz", "x.exe", "", "../"])
def test_upload_names_without_a_scan_ending_are_refused(name):
    with pytest.raises(AccessError):
        safe_upload_name(name)


def test_upload_batch_limit_counts_all_files_of_a_request(tmp_path):
    batch = UploadBatch(limit_bytes=100)
    batch.add({"name": "a.nii.gz", "size": 60, "content": [b"x" * 30, b"y" * 30]})
    with pytest.raises(AccessError, match="larger than the limit"):
        batch.add({"name": "b.nii.gz", "size": 41, "content": b"z" * 41})
    # a client that under-declares the size is still counted by what it sent
    liar = UploadBatch(limit_bytes=100)
    with pytest.raises(AccessError):
        liar.add({"name": "c.nii.gz", "size": 1, "content": b"z" * 101})
    written = batch.save(tmp_path)
    assert [p.name for p in written] == ["a.nii.gz"]
    assert written[0].read_bytes() == b"x" * 30 + b"y" * 30
    assert not list(tmp_path.glob(".*partial"))


def test_binding_policy():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "a" * 16)
    for host in ("0.0.0.0", "", "192.168.1.5"):
        with pytest.raises(InputError, match="--token"):
            check_bind(host, None)
    with pytest.raises(InputError, match="16 characters"):
        check_bind("0.0.0.0", "short")


def test_detect_command_and_progress_parsing(tmp_path):
    args = detect_command(tmp_path / "out", "t1.nii.gz", None, "m.nii.gz", model="x.pt",
                          device="cpu")
    assert args == ["-m", "SpatialMSMALib.cli", "detect", "--out", str(tmp_path / "out"),
                    "--device", "cpu", "--t1", "t1.nii.gz", "--mask", "m.nii.gz",
                    "--model", "x.pt"]
    with pytest.raises(InputError):
        detect_command(tmp_path, None)
    chunk = ("detect s:  12%|#2   | 12/100 [00:01<00:09]\rdetect s:  47%|####7  | 47/100"
             " [00:04<00:05]\r")
    assert parse_cli_progress(chunk) == (47, "detect s:  47%|####7  | 47/100 [00:04<00:05]")
    assert parse_cli_progress("loading model\n") == (None, "loading model")
    assert parse_cli_progress("") == (None, None)
    assert cli_error_message("bar 10%|\nerror: T2 file 'x' does not exist\n") == \
        "T2 file 'x' does not exist"
    assert "boom" in cli_error_message("Traceback...\n  File x\nRuntimeError: boom\n")


def test_view_command_refuses_missing_files(tmp_path, capsys):
    from SpatialMSMALib.cli import main

    env_token = os.environ.pop("SPATIAL_MSMA_VIEW_TOKEN", None)
    try:
        assert main(["view", "--t1", str(tmp_path / "none.nii.gz"), "--port", "0",
                     "--work-dir", str(tmp_path / "w")]) == 2
    finally:
        if env_token is not None:
            os.environ["SPATIAL_MSMA_VIEW_TOKEN"] = env_token
    assert "does not exist" in capsys.readouterr().err


def test_cached_sample_is_generated_once_and_atomically(tmp_path):
    from SpatialMSMALib.demo import SAMPLE_KEYS, cached_sample

    paths = cached_sample(seed=3, spacing=6.0, cache_dir=tmp_path)
    assert set(paths) == set(SAMPLE_KEYS) and all(p.exists() for p in paths.values())
    assert paths["t1"].parent.name == "demo_seed3_6mm"
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    again = cached_sample(seed=3, spacing=6.0, cache_dir=tmp_path)
    assert again == paths and {k: p.stat().st_mtime_ns for k, p in again.items()} == stamps
    assert [p.name for p in tmp_path.iterdir()] == ["demo_seed3_6mm"]  # no partial folders


def test_view_command_refuses_a_busy_port(tmp_path, capsys):
    import socket

    from SpatialMSMALib.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", "--port", str(port), "--work-dir", str(tmp_path / "w")]) == 2
    message = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in message and "--port" in message


def test_views_differ_on_size_or_content():
    import numpy as np

    from SpatialMSMALib.viewer.launch import views_differ

    a = np.zeros((50, 60, 3), np.uint8)
    assert not views_differ(a, a.copy())
    b = a.copy()
    b[:10, :10] = 255  # 3.3 % of pixels changed: mean difference 8.5 grey levels
    assert views_differ(a, b)
    assert views_differ(a, np.zeros((40, 60, 3), np.uint8))  # re-laid out: never a crash


def test_threshold_slider_position_is_on_its_step_grid():
    """The slider gets the operating rate's log10 snapped to its 0.05 grid and clamped to
    its range (0.3% = -2.52 would be snapped by the slider itself at the first key press)."""
    from SpatialMSMALib.viewer.app import FPR_RANGE_LOG10, FPR_STEP_LOG10, slider_position

    assert slider_position(0.003) == -2.5
    assert slider_position(0.005) == -2.3
    assert slider_position(0.0033) == -2.5  # log10 = -2.48
    assert slider_position(0.0037) == -2.45  # log10 = -2.43
    assert slider_position(1e-9) == FPR_RANGE_LOG10[0]
    assert slider_position(0.5) == FPR_RANGE_LOG10[1]
    for rate in (0.0011, 0.002, 0.0047, 0.013, 0.07):
        steps = (slider_position(rate) - FPR_RANGE_LOG10[0]) / FPR_STEP_LOG10
        assert abs(steps - round(steps)) < 1e-9
