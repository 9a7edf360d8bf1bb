"""What a browser client of ``spatial-msma view`` may read and write on the server.

A client names scans only through *choices* the server listed: ``data:<relative path>`` for
files in the configured data folder (read-only) and ``upload:<name>`` for files it uploaded
into this server's upload folder. Every choice is resolved again on the server, because a
client can send any string: absolute paths, ``..`` components, and symbolic links that lead
out of the folder are refused with :class:`AccessError`. Uploaded file names are reduced to a
plain base name; uploads are limited in total size per request.

Pure file-system logic with no trame import, so it is unit-tested directly.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import InputError

#: File endings the scan readers (:func:`SpatialMSMALib.io.load_volume`) accept.
SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
#: Default limit on one upload request (all files together), in megabytes.
DEFAULT_UPLOAD_LIMIT_MB = 512
#: At most this many files are listed from the data folder.
MAX_LISTED_FILES = 2000


class AccessError(InputError):
    """A client asked for a file outside what it may read, or sent a bad upload."""


def is_scan_file(name: str) -> bool:
    return name.lower().endswith(SCAN_SUFFIXES)


def _inside(root: Path, relative: str) -> Path:
    """``root / relative`` after refusing absolute paths, ``..`` and links that lead out."""
    if not relative or "\x00" in relative:
        raise AccessError("empty or malformed file name")
    for pure in (PurePosixPath(relative), PureWindowsPath(relative)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise AccessError(f"'{relative}' is not a path inside the allowed folder")
    root = root.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise AccessError(f"'{relative}' leads outside the allowed folder")
    return path


def safe_upload_name(name: str) -> str:
    """The base name of an uploaded file, restricted to letters, digits, ``._-``.

    Refuses names without a scan ending (.nii.gz, .nii, .nrrd) and hidden names."""
    base = PureWindowsPath(PurePosixPath(str(name)).name).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    if not base or base.startswith(".") or not is_scan_file(base):
        raise AccessError(f"'{name}': upload a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) scan")
    return base


@dataclass
class ScanSources:
    """The data folder (read-only, may be None) and the upload folder of one server."""

    data_dir: Path | None
    upload_dir: Path
    upload_limit_bytes: int = DEFAULT_UPLOAD_LIMIT_MB * 1024 * 1024
    #: files the server's operator named (command line, generated demo scan): ``file:<n>``
    extra_files: list[Path] = field(default_factory=list)

    def __post_init__(self):
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir)
            if not self.data_dir.is_dir():
                raise InputError(f"data folder '{self.data_dir}' does not exist")
        self.upload_dir = Path(self.upload_dir)
        self.upload_dir.mkdir(parents=True, exist_ok=True)

    def choices(self) -> list[dict]:
        """``[{"title": shown name, "value": choice}]`` for every scan file, data folder first
        (sorted, at most :data:`MAX_LISTED_FILES`), then uploads."""
        items = []
        if self.data_dir is not None:
            root = self.data_dir.resolve()
            for path in sorted(root.rglob("*")):
                if len(items) >= MAX_LISTED_FILES:
                    break
                if not is_scan_file(path.name) or not path.is_file():
                    continue
                relative = path.relative_to(root).as_posix()
                try:
                    _inside(root, relative)  # skips links that lead out of the folder
                except AccessError:
                    continue
                items.append({"title": relative, "value": f"data:{relative}"})
        for index, path in enumerate(self.extra_files):
            items.append({"title": path.name, "value": f"file:{index}"})
        for path in sorted(self.upload_dir.iterdir()):
            if path.is_file() and is_scan_file(path.name):
                items.append({"title": f"{path.name} (uploaded)", "value": f"upload:{path.name}"})
        return items

    def resolve(self, choice: str) -> Path:
        """The file behind a choice sent by a client; :class:`AccessError` if it is not one
        this server offers."""
        kind, _, relative = str(choice).partition(":")
        if kind == "data" and self.data_dir is not None:
            path = _inside(self.data_dir, relative)
        elif kind == "upload":
            path = _inside(self.upload_dir, relative)
        elif kind == "file" and relative.isdigit() and int(relative) < len(self.extra_files):
            path = self.extra_files[int(relative)]
        else:
            raise AccessError(f"'{choice}' is not a file this server offers")
        if not path.is_file() or not is_scan_file(path.name):
            raise AccessError(f"'{relative}' is not a scan file this server offers")
        return path


    def choice_for(self, path: Path) -> str:
        """The choice that names one of :attr:`extra_files`."""
        return f"file:{[Path(p) for p in self.extra_files].index(Path(path))}"


@dataclass
class UploadBatch:
    """Files of one upload request, collected chunk by chunk, refused past the size limit.

    ``add`` takes trame's client-file dicts (``name``, ``size``, ``content`` as bytes or a
    list of byte chunks); ``save`` writes them into the upload folder."""

    limit_bytes: int
    files: dict[str, bytes] = field(default_factory=dict)
    total_bytes: int = 0

    def add(self, client_file: dict) -> None:
        name = safe_upload_name(client_file.get("name", ""))
        content = client_file.get("content") or b""
        if isinstance(content, list):
            content = b"".join(content)
        declared = int(client_file.get("size") or 0)
        self.total_bytes += max(len(content), declared)
        if self.total_bytes > self.limit_bytes:
            raise AccessError(f"upload refused: larger than the limit of "
                              f"{self.limit_bytes / 2**20:.0f} MB (start the viewer with "
                              "--upload-limit-mb to change it)")
        self.files[name] = bytes(content)

    def save(self, upload_dir: Path) -> list[Path]:
        written = []
        for name, content in self.files.items():
            path = Path(upload_dir) / name
            tmp = path.with_name(f".{name}.partial")
            tmp.write_bytes(content)
            tmp.replace(path)
            written.append(path)
        return written


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only accepts connections from this machine."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_bind(host: str, token: str | None) -> None:
    """Binding to anything but a loopback address needs an access token."""
    if not is_loopback(host) and not token:
        raise InputError(f"--host {host or '(all interfaces)'} accepts connections from other "
                         "machines: give an access token with --token (or the "
                         "SPATIAL_MSMA_VIEW_TOKEN environment variable); clients then open "
                         "the URL with ?secret=TOKEN")
    if token is not None and len(token) < 16:
        raise InputError("the access token must be at least 16 characters long")


def check_port_free(host: str, port: int) -> None:
    """Refuse early, with a clear message, a port another program already listens on."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host if host != "localhost" else "127.0.0.1", port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another "
                             "--port (0: any free port)") from None
