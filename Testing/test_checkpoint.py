"""Checkpoints: safe load, checksum, atomic write, clear errors."""

import pickle

import pytest
import torch

from SpatialMSMALib import __version__
from SpatialMSMALib.checkpoint import load_checkpoint, save_checkpoint
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.score import ScoreUNet


def _model():
    torch.manual_seed(0)
    return ScoreUNet(spatial_dims=2, in_channels=1, channels=(4, 8), embed_dim=8)


def test_round_trip_restores_weights_config_and_version(tmp_path):
    model = _model()
    path = save_checkpoint(
        tmp_path / "m.pt", "score-model", model.config, {"model": model.state_dict()}, {"step": 12}
    )
    loaded = load_checkpoint(path, kind="score-model")
    assert loaded["config"] == model.config and loaded["extra"] == {"step": 12}
    assert loaded["version"] == __version__
    other = ScoreUNet(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in loaded["config"].items()}
    )
    other.load_state_dict(loaded["states"]["model"])
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(other(x, torch.tensor([0.3])), model(x, torch.tensor([0.3])))
    assert not list(tmp_path.glob(".*partial"))


def test_tampered_truncated_wrong_kind_and_unsafe_files_are_refused(tmp_path):
    model = _model()
    path = save_checkpoint(
        tmp_path / "m.pt", "score-model", model.config, {"model": model.state_dict()}
    )
    payload = torch.load(path, weights_only=True)
    payload["states"]["model"]["head.bias"] += 1.0
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(InputError, match="checksum"):
        load_checkpoint(tmp_path / "tampered.pt")
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(InputError, match="not a 'flow'"):
        load_checkpoint(path, kind="flow")

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(InputError, match="cannot be read safely"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(FileExistsError):
        save_checkpoint(path, "score-model", {}, {}, overwrite=False)
