"""Training engine for the Spatial-MSMA flow: random brain locations from cached features.

Each step draws ``scans_per_batch`` healthy training scans and ``locations_per_scan`` random
brain locations from each; the flow (with its global encoder) maximises their likelihood.
Validation is the mean NLL of a fixed sample of locations of the validation scans.
Checkpoints (last / best) hold flow, optimiser, schedule and RNG state, so a killed run
resumes where its last checkpoint left it. Under DDP every rank draws different scans.

Memory: only brain locations are kept, as float16 ``(n, L)`` per scan (about 8 MB per 2 mm
scan at L = 20), so 50 training scans need about 0.4 GB.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .spatial import (
    SpatialFlow,
    SpatialFlowConfig,
    downsample_scan,
    location_features,
    modelled_intensities,
    normalised_positions,
)
from .training_utils import restore_trainer_state, trainer_state, warmup_cosine, wrap_ddp

CHECKPOINT_KIND = "spatial-flow"


@dataclass
class SpatialTrainConfig:
    flow: dict = field(default_factory=lambda: asdict(SpatialFlowConfig()))
    steps: int = 3000
    scans_per_batch: int = 8
    locations_per_scan: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    grad_clip: float = 5.0
    val_locations_per_scan: int = 4096
    validate_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0


@dataclass
class LocationSet:
    """One scan's brain locations.

    Attributes:
        norms: ``(n, D)`` float16 raw per-location features: the selected score norms,
            then (with the intensities) the C intensities.
        index: ``(n, 3)`` int64 voxel indices in the model grid.
        lowres: ``(C, x, y, z)`` float32, the scan downsampled for the global encoder.
        shape: the model grid shape.
    """

    norms: torch.Tensor
    index: torch.Tensor
    lowres: torch.Tensor
    shape: tuple

    @classmethod
    def from_arrays(cls, local: np.ndarray, image: np.ndarray, region: np.ndarray,
                    downsample: int, intensity_features: bool = False,
                    score_features: bool = True,
                    score_levels: list[int] | None = None,
                    intensity_sigmas_vox: list[float] | None = None,
                    intensity_reference_mask: np.ndarray | None = None) -> LocationSet:
        """``local`` ``(L, X, Y, Z)`` score norms, ``image`` ``(C, X, Y, Z)`` model-space
        scan, ``region`` the locations kept; ``intensity_features`` / ``score_features`` /
        ``score_levels`` (indices, ``SpatialFlowConfig.level_indices``) choose what is kept
        per location, as the ``SpatialFlowConfig`` fields of the same names
        (``spatial.location_features``); ``intensity_sigmas_vox``
        (``SpatialFlowConfig.intensity_sigmas_vox``) gives multi-scale intensities, smoothed
        inside ``region`` (pass the brain mask, as detection does);
        ``intensity_reference_mask`` (``spatial.intensity_reference_mask``) first subtracts
        each channel's median over ``region`` and that mask (``referenced_intensities``)."""
        index = np.argwhere(region)
        image = np.asarray(image, np.float32)
        modelled = image
        sigmas = list(intensity_sigmas_vox or [0.0])
        if intensity_features and (sigmas != [0.0] or intensity_reference_mask is not None):
            modelled = modelled_intensities(image, region, sigmas, intensity_reference_mask)
        values = location_features(local[:, region], modelled[:, region],
                                   score_features=score_features,
                                   intensity_features=intensity_features,
                                   score_levels=score_levels)  # (D, n)
        return cls(values.T.contiguous().to(torch.float16),
                   torch.from_numpy(index.astype(np.int64)),
                   downsample_scan(torch.from_numpy(image), downsample),
                   tuple(region.shape))


def sample_batch(scans: list[LocationSet], n_scans: int, n_locations: int,
                 generator: torch.Generator):
    """Random scans (with replacement) and random locations of each:
    ``(norms (N, L) float32, positions (N, 3), lowres (B, C, x, y, z), owner (N,))``."""
    chosen = torch.randint(len(scans), (n_scans,), generator=generator).tolist()
    norms, positions, owner = [], [], []
    for b, s in enumerate(chosen):
        scan = scans[s]
        pick = torch.randint(len(scan.index), (n_locations,), generator=generator)
        norms.append(scan.norms[pick].float())
        positions.append(normalised_positions(scan.index[pick], scan.shape))
        owner.append(torch.full((n_locations,), b, dtype=torch.long))
    lowres = torch.stack([scans[s].lowres for s in chosen])
    return torch.cat(norms), torch.cat(positions), lowres, torch.cat(owner)


class SpatialTrainer:
    """Trains a ``SpatialFlow`` on location sets; ``run`` trains to ``config.steps``."""

    def __init__(self, config: SpatialTrainConfig, train: list[LocationSet],
                 val: list[LocationSet], out_dir: str | Path, device: str = "cpu",
                 rank: int = 0, distributed: bool = False):
        self.config = config
        self.train, self.val = train, val
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.flow = SpatialFlow(SpatialFlowConfig(**config.flow))
        # standardisation from a fixed sample of training locations (same on every rank)
        sample_gen = torch.Generator().manual_seed(config.seed + 7)
        norms, *_ = sample_batch(train, min(64, 4 * len(train)), 2048, sample_gen)
        self.flow.set_feature_statistics(norms)
        self.flow.to(self.device)
        self.optimizer = torch.optim.AdamW(self.flow.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.rank = rank
        self.generator = torch.Generator().manual_seed(config.seed + 1000 * rank)
        self.train_module = wrap_ddp(self.flow, self.device, distributed)
        self.step = 0
        self.best_val = float("inf")
        self._val_batch = None

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 2% at ``config.steps``."""
        c = self.config
        return warmup_cosine(step, c.warmup_steps, c.steps, 0.02)

    # -- checkpoints -------------------------------------------------------------------
    def save(self, name: str = "last.pt") -> Path:
        extra, states = trainer_state(self)
        states["flow"] = self.flow.state_dict()
        return save_checkpoint(self.out_dir / name, CHECKPOINT_KIND, asdict(self.config),
                               states, extra)

    def resume(self, path: str | Path) -> None:
        checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
        restore_trainer_state(self, checkpoint, path)
        self.flow.load_state_dict(checkpoint["states"]["flow"])

    # -- training ----------------------------------------------------------------------
    def train_step(self) -> float:
        c = self.config
        norms, positions, lowres, owner = sample_batch(
            self.train, c.scans_per_batch, c.locations_per_scan, self.generator)
        self.flow.train()
        log_p = self.train_module(norms.to(self.device), positions.to(self.device),
                                  lowres.to(self.device), owner.to(self.device))
        loss = -log_p.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.flow.parameters(), c.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.step += 1
        return float(loss.item())

    @torch.no_grad()
    def validate(self) -> float:
        """Mean NLL (nats) of a fixed sample of validation locations."""
        if self._val_batch is None:
            generator = torch.Generator().manual_seed(12345)
            parts = []
            for scan in self.val:
                pick = torch.randint(len(scan.index), (self.config.val_locations_per_scan,),
                                     generator=generator)
                parts.append((scan.norms[pick].float(),
                              normalised_positions(scan.index[pick], scan.shape),
                              scan.lowres[None]))
            self._val_batch = parts
        self.flow.eval()
        total, count = 0.0, 0
        for norms, positions, lowres in self._val_batch:
            g = self.flow.global_context(lowres.to(self.device))
            log_p = self.flow.log_prob(norms.to(self.device), positions.to(self.device),
                                       g.expand(len(norms), -1))
            total += float(-log_p.sum())
            count += len(norms)
        return total / count

    def run(self, progress: bool = True, stop_after: int | None = None,
            should_stop=None) -> dict:
        """Train until ``config.steps`` (or ``stop_after`` more steps); ``log.csv`` rows:
        step, train_nll, val_nll, lr, seconds. ``should_stop()`` returning True cancels
        after saving ``last.pt``."""
        from tqdm import tqdm

        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "log.csv"
        new_log = not log_path.exists()
        end = c.steps if stop_after is None else min(c.steps, self.step + stop_after)
        last = {"train_nll": float("nan"), "val_nll": float("nan")}
        with (open(log_path, "a", newline="") as log,
              tqdm(total=c.steps, initial=self.step, disable=not progress,
                   desc="spatial flow") as bar):
            writer = csv.writer(log)
            if new_log:
                writer.writerow(["step", "train_nll", "val_nll", "lr", "seconds"])
            start = time.perf_counter()
            while self.step < end:
                last["train_nll"] = self.train_step()
                bar.update(1)
                bar.set_postfix(nll=f"{last['train_nll']:.3f}")
                if self.rank != 0:
                    continue
                val = ""
                if self.step % c.validate_every == 0 or self.step == c.steps:
                    last["val_nll"] = val = self.validate()
                    if val < self.best_val:
                        self.best_val = val
                        self.save("best.pt")
                writer.writerow([self.step, f"{last['train_nll']:.5f}", val,
                                 f"{self.lr_schedule.get_last_lr()[0]:.3e}",
                                 f"{time.perf_counter() - start:.2f}"])
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    log.flush()
                    self.save("last.pt")
                if should_stop is not None and should_stop():
                    self.save("last.pt")
                    break
        return last


def load_best_flow(path: str | Path) -> SpatialFlow:
    """The flow of a trainer checkpoint (``best.pt``), in eval mode."""
    checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
    flow = SpatialFlow(SpatialFlowConfig(**checkpoint["config"]["flow"]))
    flow.load_state_dict(checkpoint["states"]["flow"])
    return flow.eval()
