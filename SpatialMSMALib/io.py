"""Reading and writing 3D volumes with their geometry.

Conventions used everywhere in the package:

* ``Volume.data`` is indexed ``[i, j, k]`` (voxel index order of the file).
* ``Volume.affine`` is the 4x4 matrix mapping a voxel index ``(i, j, k, 1)`` to RAS
  world coordinates in millimetres (the NIfTI convention). NRRD files, which are usually
  stored in LPS, are converted to RAS on read and back to LPS on write.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

#: Spacing (mm) outside this range is treated as corrupt geometry.
MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image and its geometry.

    Attributes:
        data: array of shape ``(I, J, K)``.
        affine: ``(4, 4)`` voxel index -> RAS mm.
    """

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[:3])

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k, shape ``(3,)``."""
        return voxel_spacing(self.affine)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Column norms of the 3x3 part of ``affine``: voxel size in mm, shape ``(3,)``."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def is_nrrd(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nrrd") or name.endswith(".nhdr")


def load_volume(path: str | Path, *, what: str = "image", allow_empty: bool = False) -> Volume:
    """Read a 3D NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) file.

    A trailing singleton 4th axis (shape ``(I, J, K, 1)``) is dropped. Every problem a user
    can run into (missing, unreadable or corrupt file, wrong dimensionality, NaN/Inf, all
    zero, absurd spacing) raises :class:`InputError` naming the file.

    Args:
        path: file to read.
        what: what the file is supposed to be ("T1", "brain mask", ...), used in messages.
        allow_empty: accept an all-zero volume (e.g. an empty lesion mask).
    """
    path = Path(path)
    label = f"{what} '{path}'"
    if not path.exists():
        raise InputError(f"{label}: file does not exist")
    if not path.is_file():
        raise InputError(f"{label}: is not a file")
    if is_nifti(path):
        data, affine = _read_nifti(path, label)
    elif is_nrrd(path):
        data, affine = _read_nrrd(path, label)
    else:
        raise InputError(f"{label}: unsupported file type (expected .nii, .nii.gz, .nrrd or .nhdr)")
    data = _squeeze_to_3d(data, label)
    check_geometry(affine, label)
    check_values(data, label, allow_empty=allow_empty)
    return Volume(data=data, affine=affine)


def _read_nifti(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=float)
    except (
        OSError,
        EOFError,
        ValueError,
        gzip.BadGzipFile,
        nib.filebasedimages.ImageFileError,
    ) as e:
        raise InputError(f"{label}: cannot read NIfTI file ({type(e).__name__}: {e})") from e
    return data, affine


def _read_nrrd(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as e:  # pynrrd raises a zoo of exception types for corrupt files
        raise InputError(f"{label}: cannot read NRRD file ({type(e).__name__}: {e})") from e
    directions = header.get("space directions")
    if directions is None:
        raise InputError(f"{label}: NRRD header has no 'space directions'; geometry unknown")
    rows = [np.asarray(d, dtype=float) for d in directions if d is not None and not _is_nan_row(d)]
    if len(rows) != 3:
        raise InputError(f"{label}: expected 3 spatial axes in 'space directions', got {len(rows)}")
    affine = np.eye(4)
    affine[:3, :3] = np.stack(rows, axis=1)
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = _LPS_TO_RAS @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise InputError(f"{label}: unsupported NRRD space '{space}' (expected LPS or RAS)")
    return data, affine


def _is_nan_row(row) -> bool:
    try:
        return bool(np.all(np.isnan(np.asarray(row, dtype=float))))
    except (TypeError, ValueError):
        return True


def _squeeze_to_3d(data: np.ndarray, label: str) -> np.ndarray:
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2 or (data.ndim == 3 and min(data.shape) == 1):
        raise InputError(f"{label}: is a 2D image (shape {data.shape}); a 3D volume is required")
    if data.ndim != 3:
        raise InputError(
            f"{label}: has shape {data.shape}; a single 3D volume is required "
            "(4D series with more than one volume are not supported)"
        )
    return data


def check_geometry(affine: np.ndarray, label: str) -> None:
    """Refuse affines with NaN, a singular matrix or absurd voxel sizes."""
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{label}: geometry (affine) contains NaN or Inf")
    spacing = voxel_spacing(affine)
    if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise InputError(
            f"{label}: absurd voxel spacing {np.round(spacing, 4).tolist()} mm "
            f"(allowed {MIN_SPACING_MM}-{MAX_SPACING_MM} mm); the header is probably corrupt"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{label}: geometry (affine) is singular")


def check_values(data: np.ndarray, label: str, *, allow_empty: bool = False) -> None:
    """Refuse NaN/Inf voxels and (unless allowed) all-zero volumes."""
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise InputError(f"{label}: contains {int(bad.sum())} NaN or Inf voxels")
    if data.dtype.kind not in "fiub":
        raise InputError(f"{label}: unsupported voxel type {data.dtype}")
    if not allow_empty and not np.any(data):
        raise InputError(f"{label}: all voxels are zero")


def save_volume(
    path: str | Path, data: np.ndarray, affine: np.ndarray, *, overwrite: bool = False
) -> Path:
    """Write ``data`` (shape ``(I, J, K)``) with its voxel->RAS ``affine``.

    The format follows the extension (.nii/.nii.gz or .nrrd). The file is written to a
    temporary name and renamed, so an interrupted write never leaves a truncated file.
    Refuses to replace an existing file unless ``overwrite`` is true.
    """
    path = check_output_file(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; refusing to overwrite (pass overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.partial{suffix}")
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if is_nifti(path):
        image = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
        # gzip without a timestamp: same data -> same bytes
        if suffix == ".nii.gz":
            with (
                open(tmp, "wb") as raw,
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
            ):
                gz.write(image.to_bytes())
        else:
            nib.save(image, str(tmp))
    elif is_nrrd(path):
        import nrrd

        lps = _LPS_TO_RAS @ np.asarray(affine, dtype=float)
        header = {
            "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T,
            "space origin": lps[:3, 3],
            "encoding": "gzip",
        }
        nrrd.write(str(tmp), data, header)
    else:
        raise InputError(f"'{path}': unsupported output type (use .nii, .nii.gz or .nrrd)")
    tmp.replace(path)
    return path


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Refuse, before any work, an output folder that cannot be made or written: ``path``
    is an existing file, a component of it is a file, or the deepest existing folder on
    the way is not writable. Creates nothing; returns ``Path(path)``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} '{path}' is an existing file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise InputError(f"{what} '{path}' cannot be made: '{existing}' is a file")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} '{path}': no permission to write in '{existing}'")
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Like :func:`check_output_folder` for a file to be written: refuses ``path`` when it
    is an existing folder or its folder cannot be made or written. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} '{path}' is an existing folder, not a file")
    try:
        check_output_folder(path.parent)
    except InputError as e:
        raise InputError(f"{what} '{path}' cannot be written: {e}") from None
    return path


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a ``.partial`` file renamed over it, so a reader
    never sees half a file and an interrupted write never replaces an earlier result.
    Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
