"""Position-aware score network: grid coordinates, origins through features, restoration,
flip augmentation and checkpoints."""

import numpy as np
import pytest
import torch

from SpatialMSMALib.score import ScoreUNet, score_norm_features
from SpatialMSMALib.score.network import grid_coordinates
from SpatialMSMALib.score.training import ScoreTrainConfig, ScoreTrainer, augment, random_crops


def test_grid_coordinates_run_from_minus_one_to_one_over_the_grid():
    coords = grid_coordinates(torch.tensor([[0, 0, 0]]), (5, 4, 3), (5, 4, 3))
    assert coords.shape == (1, 3, 5, 4, 3)
    torch.testing.assert_close(coords[0, 0, :, 0, 0], torch.tensor([-1, -0.5, 0, 0.5, 1.0]))
    torch.testing.assert_close(coords[0, 1, 0, :, 0], torch.tensor([-1, -1 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(coords[0, 2, 2, 3, :], torch.tensor([-1, 0, 1.0]))
    # a crop starting at grid index (1, 2, 0) of the same grid
    shifted = grid_coordinates(torch.tensor([[1, 2, 0]]), (2, 2, 3), (5, 4, 3))
    torch.testing.assert_close(shifted[0], coords[0, :, 1:3, 2:4, :])


def test_position_aware_network_depends_on_where_the_input_sits():
    torch.manual_seed(0)
    net = ScoreUNet(3, 2, (4, 8), 8, position_grid=(16, 16, 16)).eval()
    x = torch.zeros(1, 2, 8, 8, 8)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        at_start = net(x, sigma, origin=[0, 0, 0])
        elsewhere = net(x, sigma, origin=[8, 8, 8])
        default = net(x, sigma)
    assert at_start.shape == (1, 2, 8, 8, 8)
    assert (at_start - elsewhere).abs().max() > 1e-3
    torch.testing.assert_close(default, at_start)
    assert net.config["position_grid"] == [16, 16, 16]
    with pytest.raises(ValueError, match="position_grid"):
        ScoreUNet(3, 2, (4, 8), 8)(x, sigma, origin=[0, 0, 0])


class PointwisePositional:
    """A position-aware 'network' whose score depends on each voxel and its grid position
    only, so box evaluation must equal full-grid evaluation when the origin is right."""

    def __init__(self, grid):
        self.position_grid = tuple(grid)
        self.origins = []

    def __call__(self, x, sigma, origin=None):
        origin = torch.as_tensor(origin).reshape(-1, 3).expand(x.shape[0], 3)
        self.origins.append(origin[0].tolist())
        coords = grid_coordinates(origin, tuple(x.shape[2:]), self.position_grid)
        return (torch.sin(3 * x) + coords[:, :1] * 2) / sigma.view(-1, 1, 1, 1, 1)


def test_box_features_of_a_position_aware_score_match_the_full_grid():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(2, 24, 20, 16)).astype(np.float32))
    mask = np.zeros((24, 20, 16), bool)
    mask[6:14, 5:12, 4:9] = True
    sigmas = torch.tensor([1.0, 0.1])
    score = PointwisePositional((24, 20, 16))
    full_local, _ = score_norm_features(score, x, sigmas)
    local, _ = score_norm_features(score, x, sigmas, mask=mask, margin=2)
    inner = (slice(None), slice(5, 15), slice(4, 13), slice(3, 10))
    torch.testing.assert_close(local[inner], full_local[inner])
    assert score.origins[-1] == [4, 3, 2]  # the box grown by the margin and to multiples of 4


def test_restoration_passes_the_brain_box_origin():
    from SpatialMSMALib.baselines import RestorationConfig, restoration_residual
    from SpatialMSMALib.score.features import crop_around

    mask = np.zeros((32, 28, 24), bool)
    mask[10:20, 9:18, 12:20] = True
    image = np.zeros((2, 32, 28, 24), np.float32)
    score = PointwisePositional(mask.shape)
    restoration_residual(score, image, mask, RestorationConfig(steps=2, draws=1))
    box = crop_around(mask, margin=8, multiple=4)
    assert score.origins == [[b.start for b in box]] * 2


def test_flipped_crops_are_crops_of_the_mirrored_grid():
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(2, 20, 22, 18, generator=g)
    config = ScoreTrainConfig(intensity_jitter=0.0, flip_lr=True)
    crops, origins = random_crops([volume], 8, 16, g, return_origins=True)
    flipped_crops, new_origins = augment(crops.clone(), config, g, origins, (20, 22, 18))
    mirrored = volume.flip(1)
    n_flipped = 0
    for crop, before, after in zip(flipped_crops, origins, new_origins, strict=True):
        source = mirrored if before[0] != after[0] else volume
        n_flipped += int(before[0] != after[0])
        i, j, k = after.tolist()
        torch.testing.assert_close(crop, source[:, i : i + 8, j : j + 8, k : k + 8])
        torch.testing.assert_close(after[1:], before[1:])
    assert 0 < n_flipped < 16


def test_position_aware_training_checkpoint_and_model_file_round_trip(tmp_path):
    from SpatialMSMALib.model import AnomalyModel

    g = torch.Generator().manual_seed(3)
    volumes = [torch.randn(2, 20, 22, 18, generator=g) for _ in range(3)]
    config = ScoreTrainConfig(channels=[4, 8], embed_dim=8, num_levels=5, crop=12,
                              batch_size=2, steps=4, warmup_steps=1, validate_every=2,
                              checkpoint_every=2, position_encoding=True)
    trainer = ScoreTrainer(config, volumes[:2], volumes[2:], tmp_path / "run")
    trainer.run(progress=False)
    assert trainer.model.position_grid == (20, 22, 18)
    model = AnomalyModel.from_score_checkpoint(tmp_path / "run" / "last.pt")
    assert model.score_net.position_grid == (20, 22, 18)
    x, sigma = volumes[2][None, :, :12, :12, :12], torch.tensor([0.3])
    with torch.no_grad():
        expected = trainer.ema(x, sigma, origin=[4, 5, 6])
        torch.testing.assert_close(model.score_net(x, sigma, origin=[4, 5, 6]), expected)
    model.save(tmp_path / "model.pt")
    reloaded = AnomalyModel.load(tmp_path / "model.pt")
    assert reloaded.score_net.position_grid == (20, 22, 18)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.score_net(x, sigma, origin=[4, 5, 6]), expected)


def test_runs_from_before_the_position_option_still_resume():
    from SpatialMSMALib.training_utils import same_config, stored_config

    old = stored_config(ScoreTrainConfig())
    del old["position_encoding"]
    assert same_config(old, ScoreTrainConfig())
    assert not same_config(old, ScoreTrainConfig(position_encoding=True))
    assert not same_config(old | {"steps": 1}, ScoreTrainConfig())
