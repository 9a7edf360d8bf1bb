"""Score-model training engine: learning happens, and resume continues the same schedule."""

import csv

import pytest
import torch

from SpatialMSMALib.score.training import ScoreTrainConfig, ScoreTrainer, random_crops


def _volumes(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.randn(2, 20, 22, 18, generator=g)
        v = torch.nn.functional.avg_pool3d(v[None], 5, stride=1, padding=2)[0] * 3
        out.append(v)
    return out


def _config(**kw):
    base = dict(
        channels=[4, 8],
        embed_dim=8,
        num_levels=5,
        crop=12,
        batch_size=2,
        steps=6,
        warmup_steps=2,
        validate_every=3,
        checkpoint_every=3,
        learning_rate=1e-2,
    )
    base.update(kw)
    return ScoreTrainConfig(**base)


def test_crops_come_from_the_volumes():
    volumes = _volumes(2, 0)
    crops = random_crops(volumes, 12, 5, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 2, 12, 12, 12)
    c = crops[0]
    found = any(
        torch.equal(v[:, i : i + 12, j : j + 12, k : k + 12], c)
        for v in volumes
        for i in range(9)
        for j in range(11)
        for k in range(7)
    )
    assert found


def test_resume_after_a_kill_continues_the_same_schedule(tmp_path):
    train, val = _volumes(3, 1), _volumes(1, 2)
    straight = ScoreTrainer(_config(), train, val, tmp_path / "a")
    straight.run(progress=False)

    first = ScoreTrainer(_config(), train, val, tmp_path / "b")
    first.run(progress=False, stop_after=4)  # "killed" at step 4: last checkpoint is step 3
    resumed = ScoreTrainer(_config(), train, val, tmp_path / "b")
    resumed.resume(tmp_path / "b" / "last.pt")
    assert resumed.step == 3
    resumed.run(progress=False)
    assert resumed.step == 6
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(
        straight.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (tmp_path / "b" / "best.pt").exists()


def test_training_reduces_validation_loss(tmp_path):
    train, val = _volumes(4, 3), _volumes(2, 4)
    config = _config(
        steps=60,
        validate_every=60,
        checkpoint_every=60,
        ema_decay=0.9,
        channels=[8, 16],
        embed_dim=16,
    )
    trainer = ScoreTrainer(config, train, val, tmp_path)
    before = trainer.validate()
    trainer.run(progress=False)
    after = trainer.validate()
    assert after < 0.8 * before
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == 60 and rows[-1]["val_loss"] != ""


def test_warm_start_begins_from_the_source_ema_and_counts_its_steps(tmp_path):
    from SpatialMSMALib.checkpoint import load_checkpoint
    from SpatialMSMALib.errors import InputError
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.score.training import CHECKPOINT_KIND

    train, val = _volumes(3, 1), _volumes(1, 2)
    source = ScoreTrainer(_config(), train, val, tmp_path / "a")
    source.run(progress=False)
    extended = ScoreTrainer(_config(steps=4, learning_rate=5e-3), train, val, tmp_path / "b")
    extended.initialise_from(tmp_path / "a" / "last.pt")
    assert extended.step == 0 and extended.total_steps == 6
    for mine, theirs in zip(extended.model.state_dict().values(),
                            source.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    extended.run(progress=False)
    checkpoint = load_checkpoint(tmp_path / "b" / "last.pt", kind=CHECKPOINT_KIND)
    assert checkpoint["extra"]["step"] == 4 and checkpoint["extra"]["total_steps"] == 10
    assert checkpoint["extra"]["initialised_from"]["steps"] == 6
    # a resumed extension keeps counting the source's steps
    again = ScoreTrainer(_config(steps=4, learning_rate=5e-3), train, val, tmp_path / "b")
    again.resume(tmp_path / "b" / "last.pt")
    assert again.total_steps == 10
    # a chain of extensions adds up, and the model file reports the total
    third = ScoreTrainer(_config(steps=2), train, val, tmp_path / "c")
    third.initialise_from(tmp_path / "b" / "last.pt")
    assert third.total_steps == 10
    model = AnomalyModel.from_score_checkpoint(tmp_path / "b" / "last.pt")
    assert model.provenance["score_training_step"] == 10
    assert model.provenance["score_initialised_from"]["steps"] == 6
    # a different network or noise schedule would change what the features mean
    with pytest.raises(InputError, match="network"):
        ScoreTrainer(_config(channels=[4, 4]), train, val, tmp_path / "d").initialise_from(
            tmp_path / "a" / "last.pt")
    with pytest.raises(InputError, match="noise schedule"):
        ScoreTrainer(_config(sigma_max=1.0), train, val, tmp_path / "e").initialise_from(
            tmp_path / "a" / "last.pt")
    # a deployable model file (e.g. the bundled model) is a source too: its score network
    model.save(tmp_path / "model.pt")
    from_model = ScoreTrainer(_config(steps=2), train, val, tmp_path / "f")
    from_model.initialise_from(tmp_path / "model.pt")
    assert from_model.total_steps == 10 and from_model.initialised_from["kind"] != CHECKPOINT_KIND
    for mine, theirs in zip(from_model.model.state_dict().values(),
                            extended.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    with pytest.raises(InputError, match="noise schedule"):
        ScoreTrainer(_config(sigma_max=1.0), train, val, tmp_path / "g").initialise_from(
            tmp_path / "model.pt")
    # anything else is refused with the file named
    from SpatialMSMALib.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "other.pt", "flow", {}, {"a": {"w": torch.zeros(1)}}, {})
    with pytest.raises(InputError, match="other.pt.*neither"):
        ScoreTrainer(_config(), train, val, tmp_path / "h").initialise_from(tmp_path / "other.pt")


def test_a_model_file_is_a_score_source_for_a_new_flow(tmp_path):
    """train_spatial.py's --score-checkpoint also takes a model file (e.g. the bundled
    one): its score network, grid and provenance are kept, its flow and typicality dropped."""
    import hashlib

    from SpatialMSMALib.checkpoint import save_checkpoint
    from SpatialMSMALib.errors import InputError
    from SpatialMSMALib.model import AnomalyModel
    from SpatialMSMALib.spatial import Calibration, SpatialFlow, SpatialFlowConfig

    trainer = ScoreTrainer(_config(), _volumes(2, 1), _volumes(1, 2), tmp_path / "run")
    trainer.run(progress=False)
    checkpoint = tmp_path / "run" / "last.pt"
    direct = AnomalyModel.from_score_source(checkpoint)
    model = AnomalyModel.from_score_checkpoint(checkpoint, spacing_mm=4.0, shape=(20, 22, 18))
    model.spatial = SpatialFlow(SpatialFlowConfig(num_features=5, flow_layers=1, hidden=8))
    model.calibration = Calibration.from_healthy([torch.randn(1000).numpy()])
    model.save(tmp_path / "model.pt")
    reused = AnomalyModel.from_score_source(tmp_path / "model.pt")
    assert reused.spatial is None and reused.calibration is None and reused.typicality is None
    assert reused.spacing_mm == 4.0 and reused.shape == (20, 22, 18)
    for mine, theirs in zip(reused.score_net.state_dict().values(),
                            direct.score_net.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    # the same score network has the same feature-cache key from either source
    assert (reused.provenance["score_checkpoint_sha256"]
            == direct.provenance["score_checkpoint_sha256"]
            == hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    assert reused.provenance["score_model_file"]["sha256"] == hashlib.sha256(
        (tmp_path / "model.pt").read_bytes()).hexdigest()
    save_checkpoint(tmp_path / "other.pt", "flow", {}, {"a": {"w": torch.zeros(1)}}, {})
    with pytest.raises(InputError, match="other.pt.*neither"):
        AnomalyModel.from_score_source(tmp_path / "other.pt")
