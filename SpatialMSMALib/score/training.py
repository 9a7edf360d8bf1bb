"""Training engine for the score model: random crops, EMA, clipping, checkpoints, resume.

Pure training logic; ``training/train_score.py`` is the command line around it. Resuming
from the last checkpoint continues the same schedule exactly: the model, EMA, optimiser,
learning-rate schedule and the random generator state are all in the checkpoint.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..training_utils import restore_trainer_state, trainer_state, warmup_cosine, wrap_ddp
from .loss import denoising_score_matching_loss
from .network import ScoreUNet
from .schedule import GeometricNoiseSchedule

CHECKPOINT_KIND = "score-model"


@dataclass
class ScoreTrainConfig:
    """Plain-data training configuration (every field can be overridden on the CLI)."""

    channels: list = field(default_factory=lambda: [16, 32, 64])
    embed_dim: int = 64
    sigma_min: float = 0.01
    sigma_max: float = 2.0
    num_levels: int = 20
    crop: int = 32
    batch_size: int = 8
    steps: int = 3000
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    intensity_jitter: float = 0.05  # SD of a random per-crop scale and shift
    flip_lr: bool = True
    #: give the network the model-grid coordinates of every voxel (see ScoreUNet)
    position_encoding: bool = False
    validate_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0

    def schedule(self) -> GeometricNoiseSchedule:
        return GeometricNoiseSchedule(self.sigma_min, self.sigma_max, self.num_levels)

    def build_model(self, in_channels: int, spatial_dims: int = 3,
                    grid_shape: tuple[int, ...] | None = None) -> ScoreUNet:
        """The network; ``grid_shape`` (the training volumes' shape) is required with
        ``position_encoding``."""
        if self.position_encoding and grid_shape is None:
            raise ValueError("a position-aware score network needs the grid shape")
        return ScoreUNet(spatial_dims, in_channels, tuple(self.channels), self.embed_dim,
                         position_grid=tuple(grid_shape) if self.position_encoding else None)


def random_crops(
    volumes: list[torch.Tensor], size: int, batch_size: int, generator: torch.Generator,
    return_origins: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random ``size^d`` crops from a list of ``(C, *spatial)`` volumes (and,
    with ``return_origins``, the ``(B, d)`` index of each crop's first voxel)."""
    crops, origins = [], []
    for _ in range(batch_size):
        volume = volumes[int(torch.randint(len(volumes), (1,), generator=generator))]
        starts = [
            int(torch.randint(max(1, s - size + 1), (1,), generator=generator))
            for s in volume.shape[1:]
        ]
        index = (slice(None),) + tuple(slice(a, a + size) for a in starts)
        crops.append(volume[index])
        origins.append(starts)
    if return_origins:
        return torch.stack(crops), torch.tensor(origins)
    return torch.stack(crops)


def augment(
    batch: torch.Tensor, config: ScoreTrainConfig, generator: torch.Generator,
    origins: torch.Tensor | None = None, grid_shape: tuple[int, ...] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random per-sample intensity scale/shift and left-right flip (axis 0 = i = R-L in RAS
    model space). With crop ``origins (B, d)`` and the ``grid_shape`` they index, a flipped
    crop becomes the crop of the mirrored grid at ``G - size - origin`` along axis 0 (the
    model grid is centred on the brain's midline), and ``(batch, origins)`` is returned."""
    shape = (batch.shape[0],) + (1,) * (batch.dim() - 1)
    scale = 1 + config.intensity_jitter * torch.randn(shape, generator=generator)
    shift = config.intensity_jitter * torch.randn(shape, generator=generator)
    batch = batch * scale + shift
    flip = torch.zeros(batch.shape[0], dtype=torch.bool)
    if config.flip_lr:
        flip = torch.rand(batch.shape[0], generator=generator) < 0.5
        batch[flip] = batch[flip].flip(2)
    if origins is None:
        return batch
    origins = origins.clone()
    origins[flip, 0] = grid_shape[0] - batch.shape[2] - origins[flip, 0]
    return batch, origins


class ScoreTrainer:
    """Holds model, EMA copy, optimiser, schedule and RNG; ``run`` trains to ``config.steps``.

    Args:
        config: training configuration.
        train_volumes / val_volumes: lists of ``(C, *spatial)`` float tensors (model space).
        out_dir: where ``last.pt``, ``best.pt`` and ``log.csv`` go.
    """

    def __init__(
        self,
        config: ScoreTrainConfig,
        train_volumes: list[torch.Tensor],
        val_volumes: list[torch.Tensor],
        out_dir: str | Path,
        device: str = "cpu",
        rank: int = 0,
        distributed: bool = False,
    ):
        self.config = config
        self.train_volumes, self.val_volumes = train_volumes, val_volumes
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        spatial_dims = train_volumes[0].dim() - 1
        torch.manual_seed(config.seed)
        self.grid_shape = tuple(train_volumes[0].shape[1:])
        self.model = config.build_model(train_volumes[0].shape[0], spatial_dims,
                                        self.grid_shape).to(self.device)
        self.ema = copy.deepcopy(self.model).eval()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # same initial weights on every rank (seeded above); different crops per rank
        self.rank = rank
        self.generator = torch.Generator().manual_seed(config.seed + 1000 * rank)
        self.train_module = wrap_ddp(self.model, self.device, distributed)
        self.amp = self.device.type == "cuda"
        self.noise = config.schedule()
        self.step = 0
        self.best_val = float("inf")
        #: the checkpoint this run started from (``initialise_from``), else None
        self.initialised_from: dict | None = None

    @property
    def total_steps(self) -> int:
        """Steps of this run plus those of the checkpoints it was initialised from."""
        return self.step + (self.initialised_from or {}).get("total_steps", 0)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 5% at ``config.steps``."""
        c = self.config
        return warmup_cosine(step, c.warmup_steps, c.steps, 0.05)

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, name: str = "last.pt") -> Path:
        extra, states = trainer_state(self)
        extra.update(in_channels=self.model.config["in_channels"],
                     spatial_dims=self.model.config["spatial_dims"], network=self.model.config,
                     total_steps=self.total_steps, initialised_from=self.initialised_from)
        states.update(model=self.model.state_dict(), ema=self.ema.state_dict())
        return save_checkpoint(
            self.out_dir / name, CHECKPOINT_KIND, asdict(self.config), states, extra
        )

    def resume(self, path: str | Path) -> None:
        checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
        restore_trainer_state(self, checkpoint, path)
        self.model.load_state_dict(checkpoint["states"]["model"])
        self.ema.load_state_dict(checkpoint["states"]["ema"])
        self.initialised_from = checkpoint["extra"].get("initialised_from")

    def initialise_from(self, path: str | Path) -> None:
        """Warm start: a new run (fresh optimiser, schedule and step count) whose model and
        EMA both start from the EMA weights of another score checkpoint ``path``, e.g. to
        extend a finished run by another cosine cycle. ``path`` may also be a deployable
        model file (``AnomalyModel``, such as the bundled ``spatial_msma.pt``): its score
        network is the EMA network it was built from. The network and the noise schedule
        must be the ones of this run's config, so that the features keep their meaning; the
        source's digest and step count are recorded in every checkpoint written.

        Raises:
            InputError: naming ``path`` if it is neither a score checkpoint nor a model file,
                or differs in network or noise schedule.
        """
        import hashlib

        from ..errors import InputError
        from ..model import MODEL_KIND  # here: model.py imports this package

        checkpoint = load_checkpoint(path)
        if checkpoint["kind"] == CHECKPOINT_KIND:
            stored, extra = checkpoint["config"], checkpoint["extra"]
            network = extra.get("network")
            if network is None:  # written before the network config was stored
                network = ScoreTrainConfig(**stored).build_model(
                    extra["in_channels"], extra.get("spatial_dims", 3), self.grid_shape).config
            noise_levels = stored
            weights = checkpoint["states"]["ema"]
            steps = int(extra["step"])
            total_steps = int(extra.get("total_steps", extra["step"]))
        elif checkpoint["kind"] == MODEL_KIND:
            network = checkpoint["config"]["score_net"]
            noise_levels = checkpoint["config"]["schedule"]
            weights = checkpoint["states"]["score_net"]
            provenance = checkpoint["extra"].get("provenance", {})
            steps = total_steps = int(provenance.get("score_training_step", 0))
        else:
            raise InputError(f"{path}: holds a '{checkpoint['kind']}', neither a score "
                             f"checkpoint ('{CHECKPOINT_KIND}') nor a model file "
                             f"('{MODEL_KIND}')")
        mine = json.loads(json.dumps(self.model.config))
        if json.loads(json.dumps(network)) != mine:
            raise InputError(f"{path}: its network {network} is not this run's network {mine}; "
                             "pass the same architecture options as the run it comes from")
        noise = ("sigma_min", "sigma_max", "num_levels")
        theirs = {k: noise_levels.get(k) for k in noise}
        ours = {k: getattr(self.config, k) for k in noise}
        if theirs != ours:
            raise InputError(f"{path}: noise schedule {theirs} differs from this run's {ours}")
        self.model.load_state_dict(weights)
        self.ema.load_state_dict(weights)
        self.initialised_from = {
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "kind": checkpoint["kind"],
            "steps": steps,
            "total_steps": total_steps,
        }

    # -- training ------------------------------------------------------------------------
    def train_step(self) -> float:
        c = self.config
        batch, origins = random_crops(self.train_volumes, c.crop, c.batch_size, self.generator,
                                      return_origins=True)
        batch, origins = augment(batch, c, self.generator, origins, self.grid_shape)
        batch = batch.to(self.device)
        sigmas = self.noise.sample(c.batch_size, self.generator).to(self.device)
        noise = torch.randn(batch.shape, generator=self.generator).to(self.device)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = denoising_score_matching_loss(self._score_fn(self.train_module, origins),
                                                 batch, sigmas, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1 - c.ema_decay)
        self.step += 1
        return float(loss.item())

    def _score_fn(self, module, origins: torch.Tensor):
        """``(x, sigma) -> score`` of ``module``, given the crops' grid origins if the network
        is position-aware."""
        if not self.config.position_encoding:
            return module
        origins = origins.to(self.device)
        return lambda x, sigma: module(x, sigma, origin=origins)

    @torch.no_grad()
    def validate(self, n_batches: int = 4) -> float:
        """DSM loss of the EMA model on fixed validation crops (same crops every time)."""
        c = self.config
        generator = torch.Generator().manual_seed(12345)
        losses = []
        for _ in range(n_batches):
            batch, origins = random_crops(self.val_volumes, c.crop, c.batch_size, generator,
                                          return_origins=True)
            sigmas = self.noise.sample(c.batch_size, generator)
            noise = torch.randn(batch.shape, generator=generator)
            losses.append(
                denoising_score_matching_loss(
                    self._score_fn(self.ema, origins), batch.to(self.device),
                    sigmas.to(self.device), noise.to(self.device)
                ).item()
            )
        return float(sum(losses) / len(losses))

    def run(self, progress: bool = True, stop_after: int | None = None) -> dict:
        """Train until ``config.steps`` (or ``stop_after`` more steps, for tests); returns
        the last losses. Writes ``log.csv`` rows (step, train_loss, val_loss, lr, seconds)."""
        from tqdm import tqdm

        c = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "log.csv"
        new_log = not log_path.exists()
        end = c.steps if stop_after is None else min(c.steps, self.step + stop_after)
        last = {"train_loss": float("nan"), "val_loss": float("nan")}
        with (
            open(log_path, "a", newline="") as log,
            tqdm(total=c.steps, initial=self.step, disable=not progress, desc="score model") as bar,
        ):
            writer = csv.writer(log)
            if new_log:
                writer.writerow(["step", "train_loss", "val_loss", "lr", "seconds"])
            start = time.perf_counter()
            while self.step < end:
                last["train_loss"] = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{last['train_loss']:.4f}")
                val = ""
                if self.rank != 0:
                    continue
                if self.step % c.validate_every == 0 or self.step == c.steps:
                    last["val_loss"] = val = self.validate()
                    if val < self.best_val:
                        self.best_val = val
                        self.save("best.pt")
                writer.writerow(
                    [
                        self.step,
                        f"{last['train_loss']:.6f}",
                        val,
                        f"{self.lr_schedule.get_last_lr()[0]:.3e}",
                        f"{time.perf_counter() - start:.2f}",
                    ]
                )
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    log.flush()
                    self.save("last.pt")
        return last
