"""Spatial-MSMA: a conditional normalizing flow over per-location score-norm features.

For every location of the model grid the score model gives an L-vector of local score norms
(``score.features.score_norm_features``, shape ``(L, X, Y, Z)``). The flow models their
density conditioned on

- where the location is: a sinusoidal encoding of its position in the model grid
  (normalised to [-1, 1] per axis, axis order i, j, k of the RAS model grid), and
- what the whole scan looks like: a small 3D CNN (``GlobalEncoder``) of the scan downsampled
  to 8 mm, trained jointly with the flow.

The per-location negative log-likelihood (nats) is the anomaly heat map. ``Calibration``
turns heat-map values into voxel-wise false-positive rates measured on healthy validation
scans, so thresholds are set without ground truth (PROTOCOLS.md section 1).

Features enter the flow as ``(log(norm + eps) - mean) / sd`` per noise level, with mean and
SD measured on the healthy training locations (stored in the model). With
``intensity_features`` the location's own model-space intensities (one per channel,
standardised the same way without the log) are modelled jointly with the score norms: a
hybrid that lets the flow learn what intensity is normal where, off by default.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: avoids log(0) for locations whose norm is exactly zero (outside the network's crop)
LOG_EPS = 1e-6


#: ``SpatialFlowConfig.intensity_reference`` choices
INTENSITY_REFERENCES = ("none", "template_wm")
#: template white-matter probability above which a voxel is a reference voxel
REFERENCE_WM_PROBABILITY = 0.9


@dataclass
class SpatialFlowConfig:
    """Architecture of the conditional flow (plain data, stored in the model file)."""

    num_features: int = 20  # L, the number of noise levels
    in_channels: int = 2  # of the scan given to the global encoder
    flow_layers: int = 5
    hidden: int = 64
    position_frequencies: int = 4  # sin/cos at 2^0..2^(F-1) * pi per axis
    global_features: int = 8  # 0 disables the global encoder
    encoder_downsample: int = 4  # model grid (2 mm) -> 8 mm for the encoder
    mixture_components: int = 1  # > 1: diagonal Gaussian mixture base distribution
    dropout: float = 0.0
    #: also model the C model-space intensities of each location (flow input L + C values)
    intensity_features: bool = False
    #: model the L score norms (False with ``intensity_features``: an intensity-only flow,
    #: the ablation that measures what the score norms add)
    score_features: bool = True
    #: which noise levels' score norms the flow models: "all", a range "a-b" or a list
    #: "i,j,k" of level indices (0 = the largest sigma; both ends of a range included)
    score_levels: str = "all"
    #: > 0: also a learned grid of ``position_grid_features`` context values per node,
    #: ``position_grid_nodes`` nodes per axis over the model grid, read by trilinear
    #: interpolation at each location (finer anatomy than the sinusoidal encoding)
    position_grid_features: int = 0
    position_grid_nodes: int = 24
    #: with ``intensity_features``: the intensities are modelled at each of these Gaussian
    #: scales (sigma, mm; "0" = the location's own value), e.g. "0,4,8" for the voxel and
    #: its neighbourhood means (smoothing restricted to the brain mask)
    intensity_scales_mm: str = "0"
    #: voxel size (mm) of the model grid, to turn ``intensity_scales_mm`` into voxels
    grid_spacing_mm: float = 2.0
    #: with ``intensity_features``: "template_wm" subtracts from each channel, before the
    #: scales, its median over the scan's brain voxels where the template's white-matter
    #: probability exceeds 0.9 (the subject's own white matter as the intensity reference;
    #: the model grid is template space); "none" models the normalised intensities as they are
    intensity_reference: str = "none"

    def __post_init__(self):
        self.level_indices()  # fail at construction on a bad selection
        self.intensity_sigmas_vox()
        if self.intensity_reference not in INTENSITY_REFERENCES:
            raise ValueError(f"intensity reference '{self.intensity_reference}': expected one "
                             f"of {', '.join(INTENSITY_REFERENCES)}")
        if self.position_grid_features < 0 or (self.position_grid_features > 0
                                               and self.position_grid_nodes < 2):
            raise ValueError("position grid: features must be >= 0 and nodes >= 2")

    def intensity_sigmas_vox(self) -> list[float]:
        """``intensity_scales_mm`` as Gaussian sigmas in model-grid voxels (0 = unsmoothed)."""
        try:
            scales = [float(v) for v in str(self.intensity_scales_mm).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"intensity scales '{self.intensity_scales_mm}': expected "
                             "comma-separated sigmas in mm, e.g. '0,4,8'") from None
        if not scales or min(scales) < 0 or len(set(scales)) != len(scales):
            raise ValueError(f"intensity scales '{self.intensity_scales_mm}': need distinct "
                             "sigmas >= 0 (mm)")
        if self.grid_spacing_mm <= 0:
            raise ValueError(f"grid spacing {self.grid_spacing_mm} mm must be positive")
        return [v / self.grid_spacing_mm for v in scales]

    def level_indices(self) -> list[int]:
        """Indices (ascending, into the L noise levels) of the score norms modelled; empty
        without ``score_features``."""
        if not self.score_features:
            return []
        return parse_levels(self.score_levels, self.num_features)

    @property
    def score_dim(self) -> int:
        """Score-norm values per location the flow models (number of selected levels)."""
        return len(self.level_indices())

    @property
    def input_dim(self) -> int:
        """Values per location the flow models: L score norms and/or C intensities."""
        intensities = self.in_channels * len(self.intensity_sigmas_vox())
        return self.score_dim + (intensities if self.intensity_features else 0)

    @property
    def position_dim(self) -> int:
        return 3 + 6 * self.position_frequencies

    @property
    def context_dim(self) -> int:
        return self.position_dim + self.position_grid_features + self.global_features


def parse_levels(spec: str, num_levels: int) -> list[int]:
    """``"all"``, ``"a-b"`` (inclusive) or ``"i,j,k"`` -> sorted unique level indices in
    ``[0, num_levels)``; ``ValueError`` naming the problem otherwise."""
    text = str(spec).strip().lower()
    if text == "all":
        return list(range(num_levels))
    try:
        if "-" in text:
            first, last = (int(v) for v in text.split("-"))
            chosen = list(range(first, last + 1))
        else:
            chosen = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"score levels '{spec}': expected 'all', 'a-b' or 'i,j,k' "
                         "(level indices)") from None
    if not chosen or min(chosen) < 0 or max(chosen) >= num_levels:
        raise ValueError(f"score levels '{spec}': need at least one index, each in "
                         f"0..{num_levels - 1}")
    return sorted(set(chosen))


def location_features(local, image, *, score_features: bool,
                      intensity_features: bool,
                      score_levels: list[int] | None = None) -> torch.Tensor:
    """What the flow models per location, ``(D, ...)``: the score norms ``local`` ``(L, ...)``
    (only the levels ``score_levels`` when given) and/or the intensities ``image``
    ``(C, ...)`` (the ``SpatialFlowConfig`` fields of the same names choose; trailing axes:
    a grid ``(X, Y, Z)`` or a list of locations ``(n,)``). One part keeps its dtype, two
    are joined in float32. The one assembly used by training (``LocationSet``) and
    detection (``SpatialFlow.heat_map``)."""
    parts = []
    if score_features:
        local = torch.as_tensor(local)
        if score_levels is not None and len(score_levels) != local.shape[0]:
            local = local[list(score_levels)]
        parts.append(local)
    if intensity_features:
        parts.append(torch.as_tensor(image))
    if not parts:
        raise ValueError("the flow needs score_features and/or intensity_features")
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.float().to(parts[0].device) for p in parts], 0)


def intensity_reference_mask(config: SpatialFlowConfig, shape) -> np.ndarray | None:
    """Where each channel's reference median is taken, ``(X, Y, Z)`` bool on the model grid
    of ``shape`` (the template's white matter for "template_wm"), or ``None`` ("none")."""
    if not config.intensity_features or config.intensity_reference == "none":
        return None
    return _template_white_matter(float(config.grid_spacing_mm), tuple(int(v) for v in shape))


@functools.lru_cache(maxsize=4)
def _template_white_matter(spacing_mm: float, shape: tuple) -> np.ndarray:
    from .template import template_on_grid

    mask = template_on_grid(spacing_mm, shape).white_matter > REFERENCE_WM_PROBABILITY
    mask.setflags(write=False)
    return mask


def referenced_intensities(image, support: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The scan ``(C, X, Y, Z)`` minus, per channel, its median over ``support & reference``
    (both ``(X, Y, Z)`` bool: the brain mask and, e.g., the template's white matter); values
    outside ``support`` unchanged. So a constant offset of a channel inside the brain (a
    different contrast or normalisation) does not change the result. ``ValueError`` when
    fewer than 100 voxels are both brain and reference (a mask that does not cover the brain's
    white matter: the scan is not in the model grid)."""
    image = np.asarray(image, np.float32)
    support = np.asarray(support, bool)
    voxels = support & np.asarray(reference, bool)
    if voxels.sum() < 100:
        raise ValueError(f"intensity reference: only {int(voxels.sum())} brain voxels lie in "
                         "the template's white matter; is the scan in the model grid?")
    medians = [float(np.median(c[voxels])) for c in image]
    return np.stack([np.where(support, c - m, c) for c, m in zip(image, medians, strict=True)]
                    ).astype(np.float32)


def modelled_intensities(image, support: np.ndarray, sigmas_vox,
                         reference: np.ndarray | None = None) -> np.ndarray:
    """The intensities as the flow models them, ``(C * S, X, Y, Z)`` float32: the scan
    ``(C, X, Y, Z)`` referenced to ``reference`` (:func:`referenced_intensities`, skipped
    when ``None``), then at each Gaussian scale ``sigmas_vox``
    (:func:`multiscale_intensities`), both inside ``support`` (the brain mask). The one
    sequence used by training (``LocationSet``), detection (``SpatialFlow``) and the
    benchmarks."""
    if reference is not None:
        image = referenced_intensities(image, support, reference)
    return multiscale_intensities(image, support, sigmas_vox)


def multiscale_intensities(image, support: np.ndarray, sigmas_vox) -> np.ndarray:
    """The model-space scan ``(C, X, Y, Z)`` at each Gaussian scale -> ``(C * S, X, Y, Z)``
    float32, scale-major (all channels at ``sigmas_vox[0]``, then the next scale). Sigma 0
    keeps the values; others are normalised convolutions inside ``support`` ``(X, Y, Z)``
    bool (the brain mask: background never leaks in), and the input values outside it."""
    from scipy.ndimage import gaussian_filter

    image = np.asarray(image, np.float32)
    support = np.asarray(support, bool)
    weight_cache: dict = {}
    parts = []
    for sigma in sigmas_vox:
        if sigma == 0:
            parts.append(image)
            continue
        if sigma not in weight_cache:
            weight_cache[sigma] = np.maximum(gaussian_filter(support.astype(np.float32), sigma),
                                             1e-6)
        smoothed = np.stack([gaussian_filter(np.where(support, c, 0.0).astype(np.float32), sigma)
                             for c in image]) / weight_cache[sigma]
        parts.append(np.where(support, smoothed, image).astype(np.float32))
    return np.concatenate(parts, 0)


def normalised_positions(voxel_index: torch.Tensor, shape) -> torch.Tensor:
    """Voxel indices ``(N, 3)`` (int) -> positions in [-1, 1] ``(N, 3)`` float32."""
    size = torch.as_tensor(shape, dtype=torch.float32, device=voxel_index.device)
    return voxel_index.float() / (size - 1).clamp(min=1) * 2 - 1


def positional_encoding(positions: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``(N, 3)`` positions in [-1, 1] -> ``(N, 3 + 6 F)``: the positions, then
    ``sin(2^f pi p)`` and ``cos(2^f pi p)`` for f = 0..F-1 (per axis)."""
    parts = [positions]
    for f in range(frequencies):
        angle = positions * (math.pi * 2.0**f)
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1)


def grid_context(grid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Trilinear read of a ``(1, K, n, n, n)`` grid (axes in model-grid order x, y, z, nodes
    spanning [-1, 1] corner to corner) at ``(N, 3)`` positions in [-1, 1] -> ``(N, K)``."""
    # grid_sample wants (x, y, z) = indices into (W, H, D), i.e. our axes reversed
    where = positions.flip(-1).reshape(1, -1, 1, 1, 3).to(grid.dtype)
    values = F.grid_sample(grid, where, mode="bilinear", padding_mode="border",
                           align_corners=True)  # (1, K, N, 1, 1)
    return values[0, :, :, 0, 0].T


class GlobalEncoder(nn.Module):
    """Downsampled scan ``(B, C, x, y, z)`` -> global image features ``(B, out_dim)``."""

    def __init__(self, in_channels: int, out_dim: int, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv3d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(),
            nn.Linear(4 * width, out_dim), nn.Tanh(),
        )

    def forward(self, lowres: torch.Tensor) -> torch.Tensor:
        return self.net(lowres)


def downsample_scan(image: torch.Tensor, factor: int) -> torch.Tensor:
    """``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)`` -> average-pooled by ``factor`` per axis."""
    batched = image.dim() == 5
    x = image if batched else image[None]
    x = F.avg_pool3d(x.float(), factor, ceil_mode=True)
    return x if batched else x[0]


def _mixture_base(features: int, components: int):
    from nflows.distributions.base import Distribution

    class DiagonalGaussianMixture(Distribution):
        """Unconditional mixture of ``components`` diagonal Gaussians (learned)."""

        def __init__(self):
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.means = nn.Parameter(0.5 * torch.randn(components, features, generator=generator))
            self.log_scales = nn.Parameter(torch.zeros(components, features))
            self.logits = nn.Parameter(torch.zeros(components))

        def _log_prob(self, inputs, context):
            z = (inputs[:, None, :] - self.means) * torch.exp(-self.log_scales)
            per_component = (-0.5 * z.pow(2) - self.log_scales
                             - 0.5 * math.log(2 * math.pi)).sum(-1)
            return torch.logsumexp(per_component + F.log_softmax(self.logits, 0), dim=1)

        def _sample(self, num_samples, context):
            which = torch.multinomial(F.softmax(self.logits, 0), num_samples, replacement=True)
            noise = torch.randn(num_samples, features, device=self.means.device)
            return self.means[which] + noise * torch.exp(self.log_scales[which])

    return DiagonalGaussianMixture()


class SpatialFlow(nn.Module):
    """Conditional MAF over standardised log score norms, with position + global context.

    Buffers ``feature_mean`` / ``feature_sd`` ``(D,)`` hold the standardisation (set by
    ``set_feature_statistics`` from healthy training locations); ``D = config.input_dim``.
    "Raw features" below are ``(N, D)``: the L raw score norms, then (with
    ``intensity_features``) the C intensities; ``location_features`` assembles them.
    """

    def __init__(self, config: SpatialFlowConfig):
        super().__init__()
        from nflows.distributions import StandardNormal
        from nflows.flows import Flow
        from nflows.transforms import (
            CompositeTransform,
            MaskedAffineAutoregressiveTransform,
            ReversePermutation,
        )

        if config.input_dim == 0:
            raise ValueError("the flow needs score_features and/or intensity_features")
        self.config = config
        L = config.input_dim
        transforms = []
        for _ in range(config.flow_layers):
            transforms.append(ReversePermutation(L))
            transforms.append(MaskedAffineAutoregressiveTransform(
                L, config.hidden, context_features=config.context_dim, num_blocks=2,
                dropout_probability=config.dropout))
        base = (StandardNormal([L]) if config.mixture_components <= 1
                else _mixture_base(L, config.mixture_components))
        self.flow = Flow(CompositeTransform(transforms), base)
        self.encoder = (GlobalEncoder(config.in_channels, config.global_features)
                        if config.global_features > 0 else None)
        n = config.position_grid_nodes
        self.position_grid = (
            nn.Parameter(torch.zeros(1, config.position_grid_features, n, n, n))
            if config.position_grid_features > 0 else None)
        self.register_buffer("feature_mean", torch.zeros(L))
        self.register_buffer("feature_sd", torch.ones(L))

    # -- inputs ------------------------------------------------------------------------
    def intensity_channels(self, image, support: np.ndarray | None):
        """The scan ``(C, X, Y, Z)`` as the flow models it: unchanged, or referenced to the
        subject's white matter (``intensity_reference``) and/or at each of the config's
        ``intensity_scales_mm`` (``multiscale_intensities`` inside ``support``, the brain
        mask, which both need)."""
        sigmas = self.config.intensity_sigmas_vox()
        reference = intensity_reference_mask(self.config, tuple(image.shape[1:]))
        if not self.config.intensity_features or (sigmas == [0.0] and reference is None):
            return image
        if support is None:
            raise ValueError("multi-scale or referenced intensities need the brain mask "
                             "(support)")
        image = image.cpu().numpy() if torch.is_tensor(image) else image
        return torch.from_numpy(modelled_intensities(image, support, sigmas, reference))

    def location_features(self, local: torch.Tensor, image: torch.Tensor,
                          support: np.ndarray | None = None) -> torch.Tensor:
        """Per-location raw features ``(D, X, Y, Z)`` from the local score norms
        ``(L, X, Y, Z)`` and the model-space scan ``(C, X, Y, Z)``; ``support`` (the brain
        mask) bounds the smoothing of multi-scale intensities (needed only with them)."""
        image = self.intensity_channels(image, support)
        return location_features(local, image, score_features=self.config.score_features,
                                 intensity_features=self.config.intensity_features,
                                 score_levels=self.config.level_indices())

    def _unstandardised(self, raw: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` raw features -> log norms, then intensities as they are."""
        raw = raw.float()
        L = self.config.score_dim
        return torch.cat([torch.log(raw[:, :L] + LOG_EPS), raw[:, L:]], dim=1)

    def set_feature_statistics(self, raw_norms: torch.Tensor) -> None:
        """Standardisation from healthy raw features ``(N, D)``."""
        values = self._unstandardised(raw_norms)
        self.feature_mean.copy_(values.mean(0))
        self.feature_sd.copy_(values.std(0).clamp(min=1e-3))

    def transform_features(self, raw_norms: torch.Tensor) -> torch.Tensor:
        """Raw features ``(N, D)`` -> flow inputs ``(N, D)``."""
        return (self._unstandardised(raw_norms) - self.feature_mean) / self.feature_sd

    def global_context(self, lowres: torch.Tensor) -> torch.Tensor:
        """``(B, C, x, y, z)`` downsampled scans -> ``(B, global_features)``."""
        if self.encoder is None:
            return lowres.new_zeros(lowres.shape[0], 0)
        return self.encoder(lowres)

    def context(self, positions: torch.Tensor, global_features: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` positions in [-1, 1] and ``(N, G)`` global features -> ``(N, D)``."""
        parts = [positional_encoding(positions, self.config.position_frequencies)]
        if self.position_grid is not None:
            parts.append(grid_context(self.position_grid, positions))
        return torch.cat(parts + [global_features], dim=1)

    # -- densities ---------------------------------------------------------------------
    def forward(self, raw_norms: torch.Tensor, positions: torch.Tensor, lowres: torch.Tensor,
                owner: torch.Tensor) -> torch.Tensor:
        """Training entry point (what DDP wraps): log-density ``(N,)`` of locations whose
        scans are ``lowres[owner]`` (``lowres`` ``(B, C, x, y, z)``, ``owner`` ``(N,)``)."""
        return self.log_prob(raw_norms, positions, self.global_context(lowres)[owner])

    def log_prob(self, raw_norms: torch.Tensor, positions: torch.Tensor,
                 global_features: torch.Tensor) -> torch.Tensor:
        """Log-density (nats) ``(N,)`` of raw features ``(N, D)`` at positions ``(N, 3)`` in
        [-1, 1] with per-location global features ``(N, G)``. The standardisation's
        Jacobian is included, so values are densities of the log norms (and intensities)."""
        inputs = self.transform_features(raw_norms)
        log_p = self.flow.log_prob(inputs, context=self.context(positions, global_features))
        return log_p - torch.log(self.feature_sd).sum()

    @torch.no_grad()
    def heat_map(
        self,
        local: np.ndarray | torch.Tensor,
        image: np.ndarray | torch.Tensor,
        region: np.ndarray,
        chunk: int = 65536,
        device: str | torch.device = "cpu",
        progress=None,
        brain_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Negative log-likelihood map ``(X, Y, Z)`` float32 (nats) of one scan.

        Args:
            local: ``(L, X, Y, Z)`` raw local score norms.
            image: ``(C, X, Y, Z)`` the model-space scan (for the global encoder).
            region: ``(X, Y, Z)`` bool, where to evaluate (the brain mask); NaN elsewhere.
            chunk: locations per flow evaluation (bounds memory).
            progress: optional ``callable(fraction)``.
            brain_mask: ``(X, Y, Z)`` bool, where multi-scale intensities are smoothed
                (default ``region``; training uses the brain mask, so pass it).
        """
        device = torch.device(device)
        self.eval().to(device)
        support = region if brain_mask is None else brain_mask
        local = self.location_features(torch.as_tensor(local), image, support)
        shape = tuple(local.shape[1:])
        index = torch.from_numpy(np.argwhere(region)).to(device)
        lowres = downsample_scan(torch.as_tensor(image, dtype=torch.float32),
                                 self.config.encoder_downsample)[None].to(device)
        global_features = self.global_context(lowres)
        values = local.reshape(local.shape[0], -1)
        flat = torch.from_numpy(np.flatnonzero(region.reshape(-1))).to(values.device)
        nll = torch.empty(len(index), dtype=torch.float32)
        for start in range(0, len(index), chunk):
            stop = min(start + chunk, len(index))
            norms = values[:, flat[start:stop]].T.to(device)
            positions = normalised_positions(index[start:stop], shape)
            g = global_features.expand(stop - start, -1)
            nll[start:stop] = -self.log_prob(norms, positions, g).float().cpu()
            if progress:
                progress(stop / len(index))
        out = np.full(shape, np.nan, np.float32)
        out[region] = nll.numpy()
        return out


class FlowEnsemble(nn.Module):
    """Several ``SpatialFlow``s of one configuration, trained on the same healthy locations
    from different seeds; the heat map is their mean NLL (nats), the NLL of the members'
    geometric-mean density. Averaging reduces the seed-to-seed variation of a single flow's
    heat map (validation NLL varies with the seed); on the dev cohort three seeds did not
    change sensitivity (docs/spatial_msma.md), so the bundled model has one flow.

    Quacks like a ``SpatialFlow`` where inference uses one: ``config``, ``heat_map``, ``to``.
    """

    def __init__(self, members: list[SpatialFlow]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two flows")
        if any(asdict(m.config) != asdict(members[0].config) for m in members[1:]):
            raise ValueError("the flows of an ensemble must share one configuration")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def __len__(self) -> int:
        return len(self.members)

    @torch.no_grad()
    def heat_map(self, local, image, region: np.ndarray, chunk: int = 65536,
                 device: str | torch.device = "cpu", progress=None,
                 brain_mask: np.ndarray | None = None) -> np.ndarray:
        """Mean of the members' ``SpatialFlow.heat_map`` ``(X, Y, Z)`` float32 (nats), NaN
        outside ``region``; arguments as for ``SpatialFlow.heat_map``."""
        n = len(self.members)
        total = None
        for k, flow in enumerate(self.members):
            member_progress = None
            if progress:
                def member_progress(fraction, k=k):
                    progress((k + fraction) / n)
            heat = flow.heat_map(local, image, region, chunk=chunk, device=device,
                                 progress=member_progress, brain_mask=brain_mask)
            total = heat if total is None else total + heat
        return (total / n).astype(np.float32)


def flow_from_state(config: SpatialFlowConfig, state: dict, members: int = 1):
    """A ``SpatialFlow`` (``members`` 1) or ``FlowEnsemble`` of ``members`` flows with
    ``config``, loaded from ``state`` (a ``state_dict``), in eval mode."""
    flow = (SpatialFlow(config) if members == 1
            else FlowEnsemble([SpatialFlow(config) for _ in range(members)]))
    flow.load_state_dict(state)
    return flow.eval()


def build_spatial_flow(config: SpatialFlowConfig | dict) -> SpatialFlow:
    if isinstance(config, dict):
        config = SpatialFlowConfig(**config)
    return SpatialFlow(config)


# -- calibration and post-processing -----------------------------------------------------
#: false-positive rates at which the healthy heat-map quantiles are stored (log-spaced)
CALIBRATION_FPRS = np.logspace(-6, 0, 241)


@dataclass
class Calibration:
    """Maps heat-map values to voxel-wise false-positive rates on healthy validation scans.

    Attributes:
        fprs: ``(K,)`` ascending false-positive rates (fraction of healthy brain voxels).
        scores: ``(K,)`` the heat-map value exceeded by that fraction (descending).
        default_fpr: the default operating point (PROTOCOLS.md: 1% of brain voxels).
        smoothing_mm: Gaussian sigma applied to the heat map before anything else.
        rim_mm: the outer ``rim_mm`` of the brain mask is not scored (registration and
            mask differences make the brain's edge atypical in healthy scans too).
        min_component_ml: components smaller than this are removed from the label volume.
        max_peak_fpr: ``None``, or a component is also removed unless its peak reaches the
            threshold of this (stricter) voxel false-positive rate: hysteresis thresholding,
            where the operating threshold sets a component's extent and this rate decides
            whether it is reported at all (see :meth:`peak_threshold`).
        grow_rate_factor: ``None``, or each component is grown into the neighbouring voxels
            above the threshold of this multiple of the operating rate (hysteresis the other
            way: the operating threshold decides whether a component is reported, the laxer
            one its extent, and so the size the ``min_component_ml`` rule sees; see
            :meth:`labelling_thresholds`).
        n_scans / n_voxels: how much healthy data the quantiles come from.
    """

    fprs: list
    scores: list
    default_fpr: float = 0.01
    smoothing_mm: float = 2.0
    min_component_ml: float = 0.1
    rim_mm: float = 0.0
    max_peak_fpr: float | None = None
    grow_rate_factor: float | None = None
    n_scans: int = 0
    n_voxels: int = 0
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.fprs[0] <= float(self.default_fpr) <= 1:  # also refuses NaN
            raise ValueError(f"default false-positive rate {self.default_fpr} outside "
                             f"[{self.fprs[0]:.0e}, 1]")
        if self.max_peak_fpr is not None and not (
                self.fprs[0] <= float(self.max_peak_fpr) <= self.default_fpr):
            raise ValueError(f"peak false-positive rate {self.max_peak_fpr} must lie in "
                             f"[{self.fprs[0]:.0e}, the default rate {self.default_fpr}]")
        if self.grow_rate_factor is not None and not float(self.grow_rate_factor) > 1:
            raise ValueError(f"grow rate factor {self.grow_rate_factor} must exceed 1")

    @classmethod
    def from_healthy(cls, brain_values: list[np.ndarray], **settings) -> Calibration:
        """Quantiles of the pooled healthy brain heat-map values (one array per scan)."""
        pooled = np.concatenate([np.asarray(v, np.float64).ravel() for v in brain_values])
        pooled = pooled[np.isfinite(pooled)]
        if pooled.size < 1000:
            raise ValueError(f"{pooled.size} healthy voxels are too few to calibrate")
        scores = np.quantile(pooled, 1 - CALIBRATION_FPRS)
        return cls(CALIBRATION_FPRS.tolist(), scores.tolist(), n_scans=len(brain_values),
                   n_voxels=int(pooled.size), **settings)

    def threshold_for_fpr(self, fpr: float) -> float:
        """Heat-map threshold flagging a fraction ``fpr`` of healthy brain voxels."""
        fprs, scores = np.asarray(self.fprs), np.asarray(self.scores)
        if not fprs[0] <= fpr <= 1:
            raise ValueError(f"false-positive rate {fpr} outside [{fprs[0]:.0e}, 1]")
        return float(np.interp(np.log(fpr), np.log(fprs), scores))

    def fpr_of_score(self, score) -> np.ndarray:
        """Voxel-wise false-positive rate of heat-map values (clipped to the stored range)."""
        fprs, scores = np.asarray(self.fprs), np.asarray(self.scores)
        # scores descend with fpr ascending: interpolate on the reversed arrays
        log_fpr = np.interp(np.asarray(score, float), scores[::-1], np.log(fprs)[::-1])
        return np.exp(log_fpr)

    @property
    def default_threshold(self) -> float:
        return self.threshold_for_fpr(self.default_fpr)

    def peak_threshold(self, threshold: float) -> float | None:
        """The score a component's peak must reach at operating ``threshold``: that of
        ``max_peak_fpr``, or ``threshold`` itself when it is the stricter; ``None`` without
        the rule. (A higher score is more anomalous.)"""
        if self.max_peak_fpr is None:
            return None
        return max(float(threshold), self.threshold_for_fpr(self.max_peak_fpr))

    def labelling_thresholds(self, threshold: float) -> tuple[float, float | None]:
        """``(extent threshold, peak threshold)`` for ``label_anomalies`` at operating
        ``threshold``: without ``grow_rate_factor``, ``threshold`` and
        :meth:`peak_threshold`; with it, the threshold of ``grow_rate_factor`` times the
        operating rate (capped at a rate of 1) sets the extent, and a component's peak must
        still reach ``threshold`` (or the stricter :meth:`peak_threshold`)."""
        peak = self.peak_threshold(threshold)
        if self.grow_rate_factor is None:
            return float(threshold), peak
        rate = min(1.0, float(self.fpr_of_score(threshold)) * float(self.grow_rate_factor))
        extent = min(float(threshold), self.threshold_for_fpr(max(rate, self.fprs[0])))
        return extent, float(threshold) if peak is None else peak

    def to_dict(self) -> dict:
        return asdict(self)


def scored_region(brain_mask: np.ndarray, rim_mm: float, spacing_mm: float) -> np.ndarray:
    """The brain mask without its outer ``rim_mm`` (binary erosion, 6-connected steps of one
    voxel, ``round(rim_mm / spacing_mm)`` of them)."""
    from scipy.ndimage import binary_erosion

    steps = int(round(rim_mm / spacing_mm))
    mask = np.asarray(brain_mask, bool)
    return binary_erosion(mask, iterations=steps) if steps > 0 else mask


def smooth_in_region(heat: np.ndarray, region: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Gaussian smoothing of ``heat`` restricted to ``region`` (normalised convolution, so
    values outside the region do not leak in); NaN outside the region."""
    from scipy.ndimage import gaussian_filter

    filled = np.where(region, np.nan_to_num(heat), 0.0).astype(np.float32)
    if sigma_vox > 0:
        weight = gaussian_filter(region.astype(np.float32), sigma_vox)
        filled = gaussian_filter(filled, sigma_vox) / np.maximum(weight, 1e-6)
    return np.where(region, filled, np.nan).astype(np.float32)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Index slices of the smallest box holding every True voxel of a non-empty 3D mask."""
    out = []
    for other in ((1, 2), (0, 2), (0, 1)):
        hits = np.flatnonzero(np.any(mask, axis=other))
        out.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(out)


def label_anomalies(
    heat: np.ndarray, region: np.ndarray, threshold: float, spacing_mm, min_component_ml: float,
    min_peak: float | None = None,
) -> tuple[np.ndarray, int]:
    """Threshold ``heat`` inside ``region``, keep 26-connected components of at least
    ``min_component_ml`` (and, with ``min_peak``, whose highest value reaches it: hysteresis);
    returns ``(labels int16 (I, J, K), count)``, labels 1..count ordered by decreasing peak
    score."""
    from scipy import ndimage

    with np.errstate(invalid="ignore"):
        flagged = region & (heat >= threshold)  # NaN (outside the scored region) is never
    labels = np.zeros(heat.shape, np.int16)
    if not flagged.any():
        return labels, 0
    # label inside the flagged voxels' bounding box only: the same result, far less work on
    # 1 mm volumes where a few percent of the brain is flagged (the viewers' sliders)
    box = bounding_box(flagged)
    structure = np.ones((3, 3, 3), bool)
    components, count = ndimage.label(flagged[box], structure)
    voxel_ml = float(np.prod(np.asarray(spacing_mm, float))) / 1000.0
    sizes, _, peaks, _ = component_statistics(components, count, heat[box])
    ids = np.arange(1, count + 1)
    large = sizes * voxel_ml >= min_component_ml
    keep = ids[large if min_peak is None else large & (peaks >= min_peak)]
    order = keep[np.argsort(-peaks[keep - 1], kind="stable")]
    relabel = np.zeros(count + 1, np.int16)
    relabel[order] = np.arange(1, len(order) + 1, dtype=np.int16)
    labels[box] = relabel[components]
    return labels, len(order)


def component_statistics(labels: np.ndarray, count: int, values: np.ndarray):
    """Per label 1..count: voxel count ``(n,)``, value sum ``(n,)``, peak value ``(n,)`` and
    centroid in voxel indices ``(n, 3)``, from the labelled voxels only (fast on large,
    mostly empty 1 mm volumes)."""
    flat = np.flatnonzero(labels)
    lab = labels.ravel()[flat].astype(np.int64)
    val = np.nan_to_num(values.ravel()[flat].astype(np.float64), nan=-np.inf)
    sizes = np.bincount(lab, minlength=count + 1)[1:].astype(float)
    sums = np.bincount(lab, weights=val, minlength=count + 1)[1:]
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, lab, val)
    coords = np.unravel_index(flat, labels.shape)
    centroids = np.stack([np.bincount(lab, weights=c, minlength=count + 1)[1:]
                          for c in coords], axis=1) / np.maximum(sizes, 1)[:, None]
    return sizes, sums, peaks[1:], centroids
