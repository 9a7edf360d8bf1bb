"""Noise schedule, DSM loss, score network and score-norm features."""

import math

import numpy as np
import pytest
import torch

from SpatialMSMALib.score import (
    GeometricNoiseSchedule,
    ScoreUNet,
    denoising_score_matching_loss,
    score_norm_features,
)


def test_schedule_is_geometric_and_descending():
    schedule = GeometricNoiseSchedule(0.01, 2.0, 20)
    s = schedule.sigmas
    assert s.shape == (20,)
    assert s[0].item() == pytest.approx(2.0, rel=1e-5)
    assert s[-1].item() == pytest.approx(0.01, rel=1e-5)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.01 / 2.0) ** (1 / 19)))
    drawn = schedule.sample(1000, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) <= set(s.tolist())
    with pytest.raises(ValueError):
        GeometricNoiseSchedule(1.0, 0.5, 10)


def test_dsm_loss_is_minimised_by_the_true_score():
    """For x ~ N(0, v I), the noised density is N(0, (v + sigma^2) I) and its score is
    -x / (v + sigma^2); the DSM loss must be smallest there."""
    g = torch.Generator().manual_seed(0)
    v = 0.5
    x = torch.randn(4000, 1, 8, generator=g) * math.sqrt(v)
    sigmas = GeometricNoiseSchedule(0.1, 2.0, 8).sample(4000, g)
    noise = torch.randn(x.shape, generator=g)

    def scaled_true(c):
        return lambda y, s: -c * y / (v + s.view(-1, 1, 1) ** 2)

    best = denoising_score_matching_loss(scaled_true(1.0), x, sigmas, noise)
    for c in (0.8, 1.2):
        assert denoising_score_matching_loss(scaled_true(c), x, sigmas, noise) > best
    # and its value is what theory gives: 0.5 * E[v / (v + sigma^2)] (irreducible part)
    expected = 0.5 * (v / (v + sigmas**2)).mean()
    assert best.item() == pytest.approx(expected.item(), rel=0.03)


@pytest.mark.parametrize("dims, size", [(2, (28, 28)), (3, (20, 23, 17))])
def test_network_shapes_and_conditioning(dims, size):
    torch.manual_seed(0)
    net = ScoreUNet(spatial_dims=dims, in_channels=2, channels=(8, 16, 16), embed_dim=32)
    x = torch.randn(2, 2, *size)
    out_small = net(x, torch.tensor([0.1, 0.1]))
    out_large = net(x, torch.tensor([1.0, 1.0]))
    assert out_small.shape == x.shape
    # output is divided by sigma and depends on sigma through the embedding too
    assert not torch.allclose(out_small * 0.1, out_large * 1.0)
    loss = out_small.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_features_by_hand():
    """With s(x, sigma) = -x / sigma^2, sigma * s = -x / sigma: norms are known in closed form."""
    x = torch.zeros(2, 5, 5, 5)
    x[0, 2, 2, 2] = 3.0
    x[1, 2, 2, 2] = 4.0  # per-voxel channel norm 5 at the centre
    sigmas = torch.tensor([2.0, 1.0, 0.5])

    def score(y, s):
        return -y / s.view(-1, 1, 1, 1, 1) ** 2

    local, whole = score_norm_features(score, x, sigmas, neighbourhood=3, sigmas_per_pass=2)
    assert local.shape == (3, 5, 5, 5) and whole.shape == (3,)
    torch.testing.assert_close(whole, 5.0 / sigmas)
    # every voxel whose 3^3 neighbourhood contains the centre sees the full norm
    torch.testing.assert_close(local[:, 1, 1, 1], 5.0 / sigmas)
    torch.testing.assert_close(local[:, 2, 3, 2], 5.0 / sigmas)
    assert torch.all(local[:, 0, 0, 0] == 0)
    # channels do not cancel (a signed sum would give 3 - 4 = -1 for opposite signs)
    x[1, 2, 2, 2] = -4.0
    _, whole_opposite = score_norm_features(score, x, sigmas)
    torch.testing.assert_close(whole_opposite, 5.0 / sigmas)


def test_crop_around_grows_to_multiples_inside_the_array():
    from SpatialMSMALib.score.features import crop_around

    mask = np.zeros((20, 30, 9), bool)
    mask[5:8, 0:2, 3:5] = True
    region = crop_around(mask, margin=2, multiple=4)
    assert [(s.start, s.stop) for s in region] == [(3, 11), (0, 4), (1, 9)]
    mask[:] = False
    assert crop_around(mask, 2) == (slice(0, 20), slice(0, 30), slice(0, 9))


def test_masked_features_equal_the_full_computation_for_a_pointwise_score():
    """With a score that depends on each voxel only, cropping to the mask changes nothing
    inside the crop; ``whole`` sums over the mask only."""
    from SpatialMSMALib.score.features import score_norm_features

    def pointwise(x, sigma):
        return torch.sin(3 * x) / sigma.view(-1, 1, 1, 1, 1)

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(2, 24, 20, 16)).astype(np.float32))
    mask = np.zeros((24, 20, 16), bool)
    mask[6:14, 5:12, 4:9] = True
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    full_local, _ = score_norm_features(pointwise, x, sigmas)
    local, whole = score_norm_features(pointwise, x, sigmas, mask=mask, margin=2)
    per_voxel = torch.sin(3 * x).pow(2).sum(0)
    expected_whole = per_voxel[torch.from_numpy(mask)].sum().sqrt()
    torch.testing.assert_close(whole, expected_whole.repeat(3))
    inner = (slice(None), slice(5, 15), slice(4, 13), slice(3, 10))  # away from crop edges
    torch.testing.assert_close(local[inner], full_local[inner])
    assert local[:, 0].abs().sum() == 0  # outside the crop


@pytest.mark.parametrize("memory_format,shape", [(torch.channels_last_3d, (2, 16, 9, 8, 7)),
                                                  (torch.channels_last, (3, 16, 11, 10))])
def test_group_norm_is_exact_on_channels_last_input_with_a_large_mean(memory_format, shape):
    """Groups whose mean is 100 times their SD (and channels with their own offsets): the
    network's GroupNorm stays at float32 precision against a float64 reference and keeps the
    channels-last layout (torch's CPU kernel for this layout loses precision here)."""
    from torch.nn import functional as F

    from SpatialMSMALib.score.network import AccurateGroupNorm

    generator = torch.Generator().manual_seed(0)
    norm = AccurateGroupNorm(8, 16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(16, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(16, generator=generator))
    offsets = 100 + torch.randn((1, 16) + (1,) * (len(shape) - 2), generator=generator)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) + offsets
    with torch.no_grad():
        reference = F.group_norm(x, 8, norm.weight.double(), norm.bias.double())
        y = norm(x.float().contiguous(memory_format=memory_format))
    assert y.shape == x.shape
    assert y.is_contiguous(memory_format=memory_format)
    assert float((y.double() - reference).abs().max()) < 1e-4
    with torch.no_grad():  # any other layout: torch's own kernel, bit for bit
        plain = x.float().contiguous()
        assert torch.equal(norm(plain), F.group_norm(plain, 8, norm.weight, norm.bias))


def test_film_silu_fused_on_channels_last_matches_the_separate_operations():
    """FiLMBlock's GroupNorm + FiLM + SiLU: the fused channels-last pass agrees with the
    separate operations on a float64 reference to float32 rounding (groups with mean 30 SD),
    keeps the layout, and contiguous input still takes the separate operations bit for bit."""
    from torch.nn import functional as F

    from SpatialMSMALib.score.network import AccurateGroupNorm

    generator = torch.Generator().manual_seed(2)
    norm = AccurateGroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(8, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(8, generator=generator))
    x = torch.randn((2, 8, 9, 8, 7), generator=generator, dtype=torch.float64) + 30
    scale = 0.5 * torch.randn((2, 8), generator=generator, dtype=torch.float64)
    shift = 0.5 * torch.randn((2, 8), generator=generator, dtype=torch.float64)
    view = (2, 8, 1, 1, 1)
    channels_last = x.float().contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        reference = F.silu(F.group_norm(x, 4, norm.weight.double(), norm.bias.double())
                           * (1 + scale.view(view)) + shift.view(view))
        fused = norm.film_silu(channels_last, scale.float(), shift.float())
        plain = x.float().contiguous()
        separate = norm.film_silu(plain, scale.float(), shift.float())
        without_film = norm.film_silu(channels_last)
    assert fused.is_contiguous(memory_format=torch.channels_last_3d)
    assert float((fused.double() - reference).abs().max()) < 1e-5
    assert torch.equal(separate, F.silu(F.group_norm(plain, 4, norm.weight, norm.bias)
                                        * (1 + scale.float().view(view))
                                        + shift.float().view(view)))
    with torch.no_grad():
        plain_reference = F.silu(F.group_norm(x, 4, norm.weight.double(), norm.bias.double()))
    assert float((without_film.double() - plain_reference).abs().max()) < 1e-5


def test_channels_last_group_norm_film_silu_gradients():
    from SpatialMSMALib.score.network import channels_last_group_norm

    generator = torch.Generator().manual_seed(3)
    x = (torch.randn((2, 4, 3, 4, 5), generator=generator, dtype=torch.float64) + 3
         ).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    scale, shift = (torch.randn((2, 4), generator=generator, dtype=torch.float64,
                                requires_grad=True) for _ in range(2))
    weight, bias = (torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, s, t: channels_last_group_norm(a, 2, weight, bias, film_scale=s,
                                                 film_shift=t, silu=True), (x, scale, shift))


def test_channels_last_group_norm_gradients():
    from SpatialMSMALib.score.network import channels_last_group_norm

    generator = torch.Generator().manual_seed(1)
    x = (torch.randn((2, 4, 3, 4, 5), generator=generator, dtype=torch.float64) + 3
         ).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    weight = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: channels_last_group_norm(a, 2, w, b),
                                    (x, weight, bias))
