"""A small noise-conditional U-Net for 2D or 3D inputs, built for CPU throughput.

Plain 3x3(x3) convolutions with GroupNorm (:class:`AccurateGroupNorm`) and SiLU, FiLM
conditioning (per-channel scale and shift) from an embedding of log(sigma), strided-convolution
downsampling, transposed convolution upsampling, skip connections by concatenation, and no
attention (self-attention blocks dominated the run time of MONAI's diffusion U-Net on 2
cores). Fully convolutional:
trained on crops, evaluated on whole volumes; inputs whose size is not a multiple of
2^(levels-1) are padded internally and cropped back. The output is divided by sigma
(NCSNv2's parametrisation), so ``sigma * s(x, sigma)`` is O(1) at every level.

Optionally position-aware (``position_grid``): the network also sees the normalised model-grid
coordinates of every voxel as extra input channels (CoordConv), so on atlas-aligned inputs it
can learn what belongs *where* (a fully convolutional network trained on random crops
otherwise only knows the crop's content). The caller gives each input's ``origin``, the grid
index of its first voxel; :func:`score_with_origin` does so for callers that may hold either
kind of network.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def _conv(spatial_dims: int):
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def sinusoidal_embedding(log_sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """``(B,)`` -> ``(B, dim)`` sinusoidal features of log(sigma) (frequencies 1 .. 1000)."""
    half = dim // 2
    frequencies = torch.exp(torch.linspace(0, math.log(1000.0), half, device=log_sigma.device))
    angles = log_sigma[:, None].float() * frequencies[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def channels_last_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor,
                             bias: torch.Tensor, eps: float = 1e-5, *,
                             film_scale: torch.Tensor | None = None,
                             film_shift: torch.Tensor | None = None,
                             silu: bool = False) -> torch.Tensor:
    """GroupNorm of a channels-last ``x (N, C, *spatial)`` with two-pass statistics, as exact
    as ``F.group_norm`` on a contiguous tensor (relative error ~1e-6 against float64), output
    channels-last too. torch's CPU kernel for channels-last 3D input loses precision as a
    group's mean grows against its SD (relative error 5e-3 at mean/SD 30, 7e-2 at 100;
    ``benchmarks/groupnorm_precision.py``), which moved the bundled model's score norms by
    about 1.5%. Per channel: mean, then the mean square around it; the groups' variance is
    the channels' mean variance plus the spread of their means. Differentiable; the score
    features use it, training (contiguous tensors) does not need it.

    With ``film_scale`` and ``film_shift`` (both ``(N, C)``) the result is ``GN(x) * (1 +
    film_scale) + film_shift``, and with ``silu`` it goes through SiLU: both folded into the
    one pass that writes the output (per-channel scale and shift compose), which saved 8-10% of
    the score network's CPU time against separate passes; the values agree with them to float32
    rounding (~1e-7 relative)."""
    n, c = x.shape[:2]
    spatial_dims = x.dim() - 2
    rows = x.permute(0, *range(2, x.dim()), 1).reshape(n, -1, c)  # (N, voxels, C), no copy
    count = rows.shape[1]
    channel_mean = rows.sum(1, keepdim=True) / count  # (N, 1, C)
    centred = rows - channel_mean
    channel_var = centred.pow(2).sum(1) / count  # (N, C)
    channel_mean = channel_mean.view(n, num_groups, -1)
    group_mean = channel_mean.mean(2, keepdim=True)  # (N, G, 1)
    group_var = (channel_var.view(n, num_groups, -1)
                 + (channel_mean - group_mean).pow(2)).mean(2, keepdim=True)
    scale = (group_var + eps).rsqrt() * weight.view(1, num_groups, -1)  # (N, G, C/G)
    shift = bias.view(1, num_groups, -1) + (channel_mean - group_mean) * scale
    if film_scale is not None:
        factor = (1 + film_scale).view(n, num_groups, -1)
        scale = scale * factor
        shift = shift * factor + film_shift.view(n, num_groups, -1)
    out = torch.addcmul(shift.reshape(n, 1, c), centred, scale.reshape(n, 1, c))
    if silu:  # in place where autograd does not need the pre-activation
        out = F.silu(out, inplace=not out.requires_grad)
    return out.view(n, *x.shape[2:], c).permute(0, spatial_dims + 1, *range(1, spatial_dims + 1))


class AccurateGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same checkpoints) that normalises channels-last CPU
    tensors with :func:`channels_last_group_norm` instead of torch's imprecise kernel; other
    inputs go to ``F.group_norm`` unchanged. :meth:`film_silu` adds the FiLM and SiLU that
    follow it in :class:`FiLMBlock`, in the same pass where it can."""

    #: fold FiLM and SiLU into the channels-last pass (``benchmarks/groupnorm_precision.py``
    #: turns it off to time torch's kernels through :meth:`forward`)
    fuse_film_silu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_channels_last(x):
            return channels_last_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def film_silu(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                  shift: torch.Tensor | None = None) -> torch.Tensor:
        """``silu(self(x) * (1 + scale) + shift)`` (``scale``, ``shift``: ``(N, C)``; both
        ``None``: ``silu(self(x))``). CPU channels-last input: one fused pass
        (:func:`channels_last_group_norm`); anything else: the separate operations, as
        before the fusion, bit for bit."""
        if self.fuse_film_silu and _cpu_channels_last(x):
            return channels_last_group_norm(x, self.num_groups, self.weight, self.bias,
                                            self.eps, film_scale=scale, film_shift=shift,
                                            silu=True)
        h = self(x)
        if scale is not None:
            shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
            h = h * (1 + scale.view(shape)) + shift.view(shape)
        return F.silu(h)


def _cpu_channels_last(x: torch.Tensor) -> bool:
    """A CPU tensor in (only) the channels-last layout of its dimension."""
    channels_last = {5: torch.channels_last_3d, 4: torch.channels_last}.get(x.dim())
    return (x.device.type == "cpu" and channels_last is not None and not x.is_contiguous()
            and x.is_contiguous(memory_format=channels_last))


class FiLMBlock(nn.Module):
    """conv -> GroupNorm -> FiLM(embedding) -> SiLU, twice, with a residual connection."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        conv = _conv(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.norm1 = AccurateGroupNorm(min(8, out_channels), out_channels)
        self.norm2 = AccurateGroupNorm(min(8, out_channels), out_channels)
        self.film = nn.Linear(embed_dim, 2 * out_channels)
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(embedding).chunk(2, dim=1)
        h = self.norm1.film_silu(self.conv1(x), scale, shift)
        h = self.norm2.film_silu(self.conv2(h))
        return h + (x if self.skip is None else self.skip(x))


def grid_coordinates(origin: torch.Tensor, spatial: tuple[int, ...], grid: tuple[int, ...],
                     dtype=torch.float32) -> torch.Tensor:
    """Normalised coordinates ``(B, D, *spatial)`` of the voxels of inputs whose first voxel
    is at grid index ``origin (B, D)``: ``(index - (G - 1) / 2) / ((G - 1) / 2)`` per axis, i.e.
    -1 and +1 at the grid's first and last voxel (0 at its centre; the model grid is centred
    on the template brain, so a left-right mirror of the grid is ``x -> -x``)."""
    batch, dims = origin.shape
    half = torch.tensor([(g - 1) / 2 for g in grid], device=origin.device, dtype=dtype)
    axes = []
    for d, size in enumerate(spatial):
        index = origin[:, d, None].to(dtype) + torch.arange(size, device=origin.device,
                                                           dtype=dtype)[None]
        view = [batch] + [1] * dims
        view[1 + d] = size
        axes.append(((index - half[d]) / half[d]).view(view).expand(batch, *spatial))
    return torch.stack(axes, 1)


def score_with_origin(score_fn, x: torch.Tensor, sigma: torch.Tensor,
                      origin=None) -> torch.Tensor:
    """``score_fn(x, sigma)``, passing ``origin`` (grid index of x's first voxel, a sequence
    of D ints or ``(B, D)``) when ``score_fn`` is a position-aware :class:`ScoreUNet`."""
    if getattr(score_fn, "position_grid", None) is not None:
        return score_fn(x, sigma, origin=origin)
    return score_fn(x, sigma)


class ScoreUNet(nn.Module):
    """Noise-conditional score network ``s(x, sigma)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (2 for T1 + T2).
        channels: feature channels per resolution level.
        embed_dim: size of the log(sigma) embedding.
        out_channels: output channels (default: ``in_channels``, a score for every input
            channel; the segmentation-QC denoiser takes label and image channels and returns
            class logits only).
        divide_by_sigma: divide the output by the conditioning value (NCSNv2's score
            parametrisation); off for networks whose output is not a Gaussian score.
        position_grid: shape of the grid the inputs are cut from (the model grid): the network
            then also receives the normalised grid coordinates (D channels) of every voxel.
    Input ``(B, C, *spatial)``, ``sigma (B,)`` and, for a position-aware network, ``origin``
    (grid index of the input's first voxel: D ints or ``(B, D)``; default the grid's first
    voxel); output ``(B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        channels: tuple[int, ...] = (16, 32, 64),
        embed_dim: int = 64,
        out_channels: int | None = None,
        divide_by_sigma: bool = True,
        position_grid: tuple[int, ...] | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims must be 2 or 3")
        self.config = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "channels": list(channels),
            "embed_dim": embed_dim,
        }
        # only non-default extras enter the config, so older checkpoints keep their checksum
        if out_channels is not None and out_channels != in_channels:
            self.config["out_channels"] = out_channels
        if not divide_by_sigma:
            self.config["divide_by_sigma"] = False
        self.position_grid = None
        if position_grid is not None:
            if len(position_grid) != spatial_dims:
                raise ValueError(f"position_grid {tuple(position_grid)} is not {spatial_dims}D")
            self.position_grid = tuple(int(g) for g in position_grid)
            self.config["position_grid"] = list(self.position_grid)
        self.divide_by_sigma = divide_by_sigma
        conv = _conv(spatial_dims)
        transposed = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.embed_dim = embed_dim
        self.embed = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        stem_inputs = in_channels + (spatial_dims if position_grid is not None else 0)
        self.stem = conv(stem_inputs, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(channels):
            self.down_blocks.append(
                FiLMBlock(spatial_dims, channels[max(i - 1, 0)] if i else channels[0], c, embed_dim)
            )
            if i < len(channels) - 1:
                self.downsample.append(conv(c, c, 3, stride=2, padding=1))
        self.up_blocks = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in range(len(channels) - 1, 0, -1):
            self.upsample.append(transposed(channels[i], channels[i - 1], 2, stride=2))
            self.up_blocks.append(
                FiLMBlock(spatial_dims, 2 * channels[i - 1], channels[i - 1], embed_dim)
            )
        self.head = conv(channels[0], out_channels or in_channels, 3, padding=1)
        self.levels = len(channels)

    @classmethod
    def from_config(cls, config: dict) -> ScoreUNet:
        """Rebuild a network from its ``config`` dict (as stored in checkpoints)."""
        return cls(config["spatial_dims"], config["in_channels"], tuple(config["channels"]),
                   config["embed_dim"], out_channels=config.get("out_channels"),
                   divide_by_sigma=config.get("divide_by_sigma", True),
                   position_grid=config.get("position_grid"))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, origin=None) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        factor = 2 ** (self.levels - 1)
        spatial = x.shape[2:]
        pad = [(-s) % factor for s in spatial]
        if any(pad):
            x = F.pad(x, [p for size in reversed(pad) for p in (0, size)])
        embedding = self.embed(sinusoidal_embedding(torch.log(sigma), self.embed_dim))
        if self.position_grid is not None:
            dims = len(self.position_grid)
            origin = torch.as_tensor(origin if origin is not None else [0] * dims,
                                     device=x.device).reshape(-1, dims)
            coords = grid_coordinates(origin.expand(x.shape[0], dims), tuple(x.shape[2:]),
                                      self.position_grid, x.dtype)
            channels_last = x.dim() == 5 and x.is_contiguous(
                memory_format=torch.channels_last_3d) and not x.is_contiguous()
            x = torch.cat([x, coords], 1)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
        elif origin is not None:
            raise ValueError("origin given to a network without position_grid")
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, embedding)
            if i < self.levels - 1:
                skips.append(h)
                h = self.downsample[i](h)
        for up, block in zip(self.upsample, self.up_blocks, strict=True):
            h = block(torch.cat([up(h), skips.pop()], dim=1), embedding)
        out = self.head(h)
        out = out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
        if not self.divide_by_sigma:
            return out
        shape = (-1,) + (1,) * (x.dim() - 1)
        return out / sigma.view(shape)
