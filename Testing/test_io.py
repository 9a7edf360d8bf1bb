"""Reading/writing volumes and the errors users hit."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from SpatialMSMALib.errors import InputError
from SpatialMSMALib.io import load_volume, save_volume


def _oblique_affine():
    theta = np.deg2rad(17)
    a = np.eye(4)
    a[:3, :3] = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    ) @ np.diag([1.2, 0.9, 2.5])
    a[:3, 3] = [-40.5, 12.25, 7.0]
    return a


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.nrrd"])
def test_round_trip_keeps_data_and_geometry(tmp_path, rng, name):
    data = rng.normal(size=(7, 9, 5)).astype(np.float32)
    affine = _oblique_affine()
    save_volume(tmp_path / name, data, affine)
    back = load_volume(tmp_path / name)
    np.testing.assert_array_equal(back.data, data)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_allclose(back.spacing, [1.2, 0.9, 2.5], atol=1e-5)


def test_nrrd_is_lps_on_disk(tmp_path):
    import nrrd

    save_volume(tmp_path / "v.nrrd", np.ones((3, 3, 3), np.float32), np.eye(4))
    _, header = nrrd.read(str(tmp_path / "v.nrrd"))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space directions"], np.diag([-1.0, -1.0, 1.0]))


def test_gzip_output_is_byte_reproducible(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    save_volume(tmp_path / "a.nii.gz", data, np.eye(4))
    save_volume(tmp_path / "b.nii.gz", data, np.eye(4))
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()


def test_refuses_to_overwrite(tmp_path):
    save_volume(tmp_path / "a.nii.gz", np.ones((2, 2, 2)), np.eye(4))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_volume(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
    assert load_volume(tmp_path / "a.nii.gz").data.sum() == 8
    save_volume(tmp_path / "a.nii.gz", np.full((2, 2, 2), 2.0), np.eye(4), overwrite=True)
    assert load_volume(tmp_path / "a.nii.gz").data.sum() == 16


def test_trailing_singleton_axis_is_dropped(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    assert load_volume(tmp_path / "x.nii.gz").shape == (4, 5, 6)


def _write(tmp_path, data, affine=None, name="x.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.nii.gz", "does not exist"),
        (lambda p: _corrupt(p), "cannot read NIfTI"),
        (lambda p: _truncated(p), "cannot read NIfTI"),
        (lambda p: _text_file(p), "unsupported file type"),
        (lambda p: _bad_nrrd(p), "cannot read NRRD"),
        (lambda p: _write(p, np.ones((5, 6), np.float32)), "2D image"),
        (lambda p: _write(p, np.ones((5, 6, 1), np.float32)), "2D image"),
        (lambda p: _write(p, np.ones((5, 6, 7, 3), np.float32)), "single 3D volume"),
        (lambda p: _write(p, np.zeros((5, 6, 7), np.float32)), "all voxels are zero"),
        (lambda p: _write(p, _with_nan()), "NaN or Inf"),
        (
            lambda p: _write(p, np.ones((5, 6, 7), np.float32), np.diag([0.001, 1, 1, 1])),
            "absurd voxel spacing",
        ),
        (
            lambda p: _write(p, np.ones((5, 6, 7), np.float32), np.diag([50.0, 1, 1, 1])),
            "absurd voxel spacing",
        ),
    ],
)
def test_bad_input_gives_clear_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        load_volume(path, what="T1")
    assert str(path) in str(info.value)
    assert str(info.value).startswith("T1 '")


def _with_nan():
    a = np.ones((5, 6, 7), np.float32)
    a[1, 2, 3] = np.nan
    return a


def _corrupt(p):
    path = p / "bad.nii.gz"
    path.write_bytes(b"this is not a nifti file at all" * 20)
    return path


def _truncated(p):
    path = p / "trunc.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return path


def _text_file(p):
    path = p / "x.txt"
    path.write_text("hi")
    return path


def _bad_nrrd(p):
    path = p / "bad.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4\n\n" + b"\x00" * 10)
    return path


def test_refuses_to_write_over_a_folder(tmp_path):
    (tmp_path / "a.nii.gz").mkdir()
    for overwrite in (False, True):
        with pytest.raises(InputError, match="is an existing folder, not a file"):
            save_volume(tmp_path / "a.nii.gz", np.ones((2, 2, 2)), np.eye(4),
                        overwrite=overwrite)
    assert (tmp_path / "a.nii.gz").is_dir()
