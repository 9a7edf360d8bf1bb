"""Baseline anomaly maps for brain MRI, compared with Spatial-MSMA in one harness.

Every baseline turns a model-space scan ``image (C, X, Y, Z)`` (float32, normalised
intensities, RAS model grid) and its ``brain_mask (X, Y, Z)`` into a raw score map
``(X, Y, Z)`` (higher = more anomalous). The harness (``benchmarks/baselines.py``) then
applies the same post-processing to every method (``smooth_in_region``, the scored region
without the brain rim, a threshold at a voxel false-positive rate of healthy validation
scans, the native-grid mapping and the minimum component size), so the methods differ only in
their score maps.

- ``VoxelZScore``: per-voxel mean and SD of the healthy training scans, ``sqrt(mean_c z_c^2)``.
- ``LocationGMM``: MSMA without spatial conditioning, a Gaussian mixture over the per-location
  L-dim score-norm features (the flow's inputs) pooled over locations; score = -log p.
- a reconstruction autoencoder (MONAI ``AutoEncoder``), ``train_autoencoder`` and
  ``reconstruction_residual``: per-voxel L2 norm over channels of ``x - AE(x)``.
- ``restoration_residual``: the scan is noised to ``start_sigma`` and restored by annealed
  denoising with the project's score network (Tweedie steps ``x + sigma^2 s(x, sigma)``,
  re-noised to the next, smaller level); the score is the residual to the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .score.features import crop_around
from .score.network import score_with_origin
from .spatial import LOG_EPS


# -- voxel-wise z-score -------------------------------------------------------------------
@dataclass
class VoxelZScore:
    """Per-voxel healthy mean and SD ``(C, X, Y, Z)``; the SD is floored at ``sd_floor``
    times the median in-brain SD of each channel, so voxels where all training scans agree
    (background, the mask edge) do not explode."""

    mean: np.ndarray
    sd: np.ndarray

    @classmethod
    def fit(cls, scans, sd_floor: float = 0.25) -> VoxelZScore:
        """``scans``: iterable of ``(image (C, X, Y, Z), brain_mask (X, Y, Z))`` healthy
        model-space scans (streamed: running sums, memory of a few volumes). The SD floor is
        ``sd_floor`` times each channel's median SD over voxels inside any training brain."""
        count, total, total_sq, brain = 0, None, None, None
        for image, mask in scans:
            x = np.asarray(image, np.float64)
            total = x.copy() if total is None else total + x
            total_sq = x * x if total_sq is None else total_sq + x * x
            brain = np.asarray(mask, bool) if brain is None else brain | np.asarray(mask, bool)
            count += 1
        if count < 2:
            raise ValueError("a voxel-wise z-score needs at least two healthy scans")
        mean = total / count
        sd = np.sqrt(np.maximum(total_sq / count - mean * mean, 0) * count / (count - 1))
        floor = sd_floor * np.median(sd[:, brain], axis=1)
        sd = np.maximum(sd, np.maximum(floor, 1e-6)[:, None, None, None])
        return cls(mean.astype(np.float32), sd.astype(np.float32))

    def score(self, image: np.ndarray) -> np.ndarray:
        z = (np.asarray(image, np.float32) - self.mean) / self.sd
        return np.sqrt((z * z).mean(axis=0)).astype(np.float32)


# -- MSMA without spatial conditioning --------------------------------------------------
def log_features(local: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``(L, X, Y, Z)`` raw local score norms -> ``(N, L)`` log norms at the ``region``
    voxels (the transform the flow applies before its standardisation)."""
    return np.log(np.asarray(local, np.float32)[:, region].T + LOG_EPS)


@dataclass
class LocationGMM:
    """A full-covariance Gaussian mixture over standardised log score norms of healthy
    locations, position-blind (the spatial flow's ablation)."""

    mean: np.ndarray  # (L,)
    sd: np.ndarray  # (L,)
    model: object  # sklearn GaussianMixture

    @classmethod
    def fit(cls, samples: np.ndarray, components: int = 8, seed: int = 0) -> LocationGMM:
        """``samples (N, L)``: log norms of healthy locations (``log_features``)."""
        from sklearn.mixture import GaussianMixture

        mean, sd = samples.mean(0), np.maximum(samples.std(0), 1e-3)
        gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4,
                              random_state=seed, max_iter=200)
        gmm.fit((samples - mean) / sd)
        return cls(mean, sd, gmm)

    def score(self, local: np.ndarray, region: np.ndarray, chunk: int = 200_000) -> np.ndarray:
        """Negative log-likelihood map ``(X, Y, Z)``, NaN outside ``region``."""
        values = (log_features(local, region) - self.mean) / self.sd
        nll = np.concatenate([-self.model.score_samples(values[i : i + chunk])
                              for i in range(0, len(values), chunk)]) if len(values) else []
        out = np.full(region.shape, np.nan, np.float32)
        out[region] = nll
        return out


# -- reconstruction autoencoder ------------------------------------------------------------
@dataclass
class AutoencoderConfig:
    """MONAI ``AutoEncoder`` (strided convolutions, residual units, no dense bottleneck) trained
    with MSE on random crops of healthy model-space scans; fully convolutional, so it is
    evaluated on the brain's bounding box."""

    channels: tuple = (32, 64, 128, 256)
    strides: tuple = (2, 2, 2, 2)
    crop: int = 64
    batch_size: int = 4
    steps: int = 1500
    learning_rate: float = 1e-3
    seed: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["channels"], out["strides"] = list(self.channels), list(self.strides)
        return out


def build_autoencoder(config: AutoencoderConfig, in_channels: int) -> torch.nn.Module:
    from monai.networks.nets import AutoEncoder

    return AutoEncoder(spatial_dims=3, in_channels=in_channels, out_channels=in_channels,
                       channels=tuple(config.channels), strides=tuple(config.strides),
                       num_res_units=1, norm="INSTANCE")


def _brain_crops(images: list[torch.Tensor], boxes: list[tuple], size: int, batch: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``batch`` random ``size^3`` crops whose centres lie in each scan's brain box."""
    out = []
    for _ in range(batch):
        i = int(torch.randint(len(images), (1,), generator=generator))
        image, box = images[i], boxes[i]
        starts = []
        for axis, (lo, hi) in enumerate(box):
            centre = int(torch.randint(lo, max(lo + 1, hi), (1,), generator=generator))
            full = image.shape[1 + axis]
            starts.append(min(max(0, centre - size // 2), max(0, full - size)))
        out.append(image[(slice(None),) + tuple(slice(a, a + size) for a in starts)])
    return torch.stack(out)


def train_autoencoder(
    images: list[np.ndarray],
    masks: list[np.ndarray],
    config: AutoencoderConfig,
    device: str | torch.device = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Train on healthy ``(C, X, Y, Z)`` scans; returns the network (eval mode) and the
    per-step losses. ``progress(step, loss)`` is called every step (it may raise to stop)."""
    device = torch.device(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    net = build_autoencoder(config, images[0].shape[0]).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, config.steps))
    volumes = [torch.from_numpy(np.asarray(x, np.float32)) for x in images]
    boxes = []
    for mask in masks:
        index = np.argwhere(mask)
        boxes.append(list(zip(index.min(0).tolist(), (index.max(0) + 1).tolist(), strict=True)))
    losses = []
    net.train()
    for step in range(config.steps):
        batch = _brain_crops(volumes, boxes, config.crop, config.batch_size, generator)
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.mse_loss(net(batch).float(), batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, losses[-1])
    return net.eval(), losses


@torch.inference_mode()
def reconstruction_residual(net: torch.nn.Module, image: np.ndarray, brain_mask: np.ndarray,
                            device: str | torch.device = "cpu", multiple: int = 16
                            ) -> np.ndarray:
    """``||x - AE(x)||_2`` over channels ``(X, Y, Z)``, computed on the brain's bounding box
    (grown to a multiple of the network's total stride where the volume allows, else padded
    by edge replication); 0 outside it."""
    box = crop_around(np.asarray(brain_mask, bool), margin=4, multiple=multiple)
    x = torch.from_numpy(np.asarray(image, np.float32)[(slice(None),) + box])[None].to(device)
    pad = [(-s) % multiple for s in x.shape[2:]]
    padded = torch.nn.functional.pad(x, [p for size in reversed(pad) for p in (0, size)],
                                     mode="replicate") if any(pad) else x
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in x.shape[2:])
    residual = (x - net(padded).float()[crop]).pow(2).sum(1).sqrt()[0].cpu().numpy()
    out = np.zeros(brain_mask.shape, np.float32)
    out[box] = residual
    return out


# -- restoration with the score network ----------------------------------------------------
@dataclass
class RestorationConfig:
    """Annealed restoration: noise to ``start_sigma``, then ``steps`` denoising steps on a
    geometric ladder down to ``end_sigma``, ``draws`` independent restorations averaged."""

    start_sigma: float = 0.5
    end_sigma: float = 0.02
    steps: int = 6
    draws: int = 2
    seed: int = 0

    def ladder(self) -> torch.Tensor:
        return torch.logspace(np.log10(self.start_sigma), np.log10(self.end_sigma), self.steps)


@torch.inference_mode()
def restoration_residual(score_net: torch.nn.Module, image: np.ndarray,
                         brain_mask: np.ndarray, config: RestorationConfig,
                         device: str | torch.device = "cpu") -> np.ndarray:
    """Residual ``(X, Y, Z)``: L2 over channels of ``x - mean_draws(restored x)``, on the
    brain's bounding box (0 outside). Network evaluations: ``steps`` passes of a batch of
    ``draws``."""
    device = torch.device(device)
    box = crop_around(np.asarray(brain_mask, bool), margin=8, multiple=4)
    x = torch.from_numpy(np.asarray(image, np.float32)[(slice(None),) + box]).to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    sigmas = config.ladder().to(device)
    batch = x.unsqueeze(0).expand(config.draws, *x.shape)
    current = batch + sigmas[0] * torch.randn(batch.shape, generator=generator, device=device)
    for i, sigma in enumerate(sigmas):
        level = sigma.expand(config.draws)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            score = score_with_origin(score_net, current, level,
                                      [b.start for b in box]).float()
        denoised = current + sigma**2 * score  # Tweedie: E[x | x + sigma * noise]
        if i + 1 < len(sigmas):
            current = denoised + sigmas[i + 1] * torch.randn(
                batch.shape, generator=generator, device=device)
        else:
            current = denoised
    residual = (x - current.mean(0)).pow(2).sum(0).sqrt().cpu().numpy()
    out = np.zeros(brain_mask.shape, np.float32)
    out[box] = residual
    return out
