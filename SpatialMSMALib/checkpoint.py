"""Safe, self-describing checkpoints.

A checkpoint is a ``torch.save`` file holding only tensors and plain data (loadable with
``torch.load(weights_only=True)``, which executes no code): the format name, the package
version, the config (JSON text), named state dicts of tensors, and a SHA-256 checksum over
all of that. Writes go to a temporary file that is renamed, so a crash never leaves a
truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from . import __version__
from .errors import InputError

FORMAT = "spatial-msma-checkpoint/1"


def _digest(
    kind: str, config_json: str, states: dict[str, dict[str, torch.Tensor]], extra_json: str
) -> str:
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(config_json.encode())
    h.update(extra_json.encode())
    for name in sorted(states):
        for key in sorted(states[name]):
            tensor = states[name][key].detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}/{key}/{tensor.dtype}/{tuple(states[name][key].shape)}".encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    path: str | Path,
    kind: str,
    config: dict,
    states: dict[str, dict[str, torch.Tensor]],
    extra: dict | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write a checkpoint atomically.

    Args:
        kind: what it holds, e.g. "score-model".
        config: plain JSON-serialisable configuration.
        states: named state dicts (tensors only), e.g. ``{"model": ..., "ema": ...}``.
        extra: plain JSON-serialisable data (step counters, RNG seeds, metrics).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' already exists; refusing to overwrite")
    config_json = json.dumps(config, sort_keys=True)
    extra_json = json.dumps(extra or {}, sort_keys=True)
    states = {n: {k: v.detach().cpu() for k, v in s.items()} for n, s in states.items()}
    payload = {
        "format": FORMAT,
        "version": __version__,
        "kind": kind,
        "config_json": config_json,
        "extra_json": extra_json,
        "states": states,
        "sha256": _digest(kind, config_json, states, extra_json),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict:
    """Load and verify a checkpoint without executing code.

    Returns a dict with ``kind``, ``version``, ``config``, ``extra`` and ``states``. Raises
    :class:`InputError` for a missing, corrupt, tampered or wrong-kind file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise InputError(
            f"checkpoint '{path}' cannot be read safely "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"'{path}' is not a SpatialMSMA checkpoint")
    digest = _digest(
        payload["kind"], payload["config_json"], payload["states"], payload["extra_json"]
    )
    if digest != payload.get("sha256"):
        raise InputError(
            f"checkpoint '{path}' failed its checksum: the file is corrupt or was modified"
        )
    if kind is not None and payload["kind"] != kind:
        raise InputError(f"checkpoint '{path}' holds a '{payload['kind']}', not a '{kind}'")
    return {
        "kind": payload["kind"],
        "version": payload["version"],
        "config": json.loads(payload["config_json"]),
        "extra": json.loads(payload["extra_json"]),
        "states": payload["states"],
    }
