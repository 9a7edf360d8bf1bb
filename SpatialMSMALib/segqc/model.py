"""GNSM on label maps: an image-conditioned denoiser of ExpConcrete-noised tissue maps.

Noise (the GNSM schedule of :mod:`SpatialMSMALib.gnsm.noise`, per voxel): a map with ``K``
classes is one-hot; level ``l`` (0 = most noise) draws

    y = log_softmax((alpha_l + g) / tau_l),   alpha_l = log((1 - m_l) onehot + m_l / K),

with ``g`` i.i.d. Gumbel(0, 1). A 3D U-Net (:class:`~SpatialMSMALib.score.network.ScoreUNet`)
takes ``y`` (K channels) and the model-space T1 (1 channel), conditioned on ``tau_l``; the
model's ExpConcrete score is ``tau (K q - 1)`` for a probability vector ``q`` built from the
network's output (:func:`denoising_loss`: the network recognises the clean label). Denoising
score matching on good maps minimises the per-voxel KL between the true score's probability
vector ``softmax(alpha_l - tau_l y)`` and ``q``.
Where the noise has hidden a voxel's label, the only way to restore it is the image and the
neighbouring labels, so the loss at a voxel measures how far its label is from what a good
segmentation of this image would say there.

Scoring a map (``score_map``):
- per-voxel loss at every level with one fixed noise draw per level (seeded, drawn on the whole
  model grid), so a map's score is deterministic and depends on nothing else;
- the voxel map: the loss summed over levels (model grid; where the map looks wrong);
- the L-vector: per level, the class-balanced mean loss: for each tissue class ``k``, the mean
  over the voxels that the map labels ``k`` or the denoiser (at the noisiest level) labels
  ``k``, then the mean over tissue classes. This mirrors the mean per-class Dice, where a wrong
  CSF voxel counts as much relative to the CSF volume as a wrong WM voxel relative to WM;
- the QC score (``SegQCConfig.readout``; all are computed in one pass, ``QCResult.readouts``):
  ``top_level_kl`` (default) is the L-vector's first entry, the noisiest level, where 90% of
  the labels are replaced at random (``mix_max`` 0.9) and the denoiser has to read the tissue
  from the image: how far the map is from what the image says. ``class_balanced_kl`` sums
  the L-vector (a bound on the map's negative log-likelihood given the image, up to the class
  weighting), ``plain_mean_kl`` is the unweighted mean of the voxel map,
  ``soft_dice_error`` / ``top_level_dice_error`` compare the map with the denoiser's clean-label
  posterior (``top_level_soft_dice_error``: the noisiest level's posterior only). The default
  was chosen on corrupted *validation* maps (``benchmarks/seg_qc.py --test-splits val``). With
  the first model (8/16/32 channels, 8 levels, 1,000 steps) the sums over levels separated
  damaged from clean maps slightly better (AUROC 0.96-0.98 vs 0.94) but ranked kinds of damage
  unlike Dice (isolated wrong voxels are far more surprising than a shifted boundary),
  Spearman -0.60 to -0.65 vs -0.78. With the bundled model (16/32/64 channels, 4 levels, 2,000
  steps) the noisiest level wins on both (Spearman -0.92, AUROC 0.99, against -0.57 / 0.95
  for the sum). The percentile among good maps uses the validation maps' scores stored in
  the model at training time.

Label convention: 0 background, 1 CSF, 2 GM, 3 WM. Arrays are on the model grid (MNI-aligned
RAS, ``spacing_mm``), axis order (X, Y, Z).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import InputError
from ..gnsm.noise import GumbelNoiseSchedule
from ..score.features import crop_around
from ..score.network import ScoreUNet
from ..training_utils import stored_config
from .corruptions import mean_dice

MODEL_KIND = "seg-qc-model"
TRAINING_KIND = "seg-qc-training"
TISSUE_CLASSES = (1, 2, 3)
# QC read-outs of one scoring pass (see score_map); the config picks the QC score
READOUTS = ("top_level_kl", "class_balanced_kl", "plain_mean_kl", "soft_dice_error",
            "top_level_dice_error", "top_level_soft_dice_error")


@dataclass
class SegQCConfig:
    """Everything that defines a QC model and its training run."""

    classes: int = 4
    image_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    embed_dim: int = 32
    num_levels: int = 4
    tau_max: float = 20.0
    tau_min: float = 2.0
    mix_max: float = 0.9
    mix_min: float = 1e-3
    readout: str = "top_level_kl"
    spacing_mm: float = 2.0
    shape: tuple[int, int, int] = (96, 112, 96)
    crop: int = 32
    batch_size: int = 8
    steps: int = 2000
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    seed: int = 0
    #: training augmentation: smooth random displacement (voxels, standard deviation of the
    #: coarse 4^3 control field) and isotropic scale jitter (+-fraction) of each crop, so
    #: the model sees more anatomical variety than the training subjects hold
    deform_voxels: float = 0.0
    scale_jitter: float = 0.0

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.shape = tuple(int(s) for s in self.shape)
        if self.classes < 2:
            raise ValueError("a label map needs at least 2 classes")
        if self.readout not in READOUTS:
            raise ValueError(f"unknown read-out '{self.readout}' (have: {READOUTS})")
        if self.crop % 2 ** (len(self.channels) - 1):
            raise ValueError(f"crop {self.crop} must be a multiple of "
                             f"{2 ** (len(self.channels) - 1)}")

    @property
    def schedule(self) -> GumbelNoiseSchedule:
        return GumbelNoiseSchedule(tau_max=self.tau_max, tau_min=self.tau_min,
                                   num_levels=self.num_levels, mix_max=self.mix_max,
                                   mix_min=self.mix_min)

    def network(self) -> ScoreUNet:
        return ScoreUNet(3, self.classes + self.image_channels, self.channels, self.embed_dim,
                         out_channels=self.classes, divide_by_sigma=False)


def noisy_labels(codes: torch.Tensor, taus: torch.Tensor, mixes: torch.Tensor, classes: int,
                 uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ExpConcrete noise for label maps.

    Args:
        codes: ``(B, *spatial)`` integer labels in ``[0, classes)``.
        taus, mixes: ``(B,)`` temperature and category-mixing weight per map.
        uniform: ``(B, K, *spatial)`` uniforms in (0, 1) (the Gumbel draw ``-log(-log u)``).
    Returns:
        ``y`` (noisy log-probabilities) and ``target`` (``log_softmax(alpha - tau y)``, the
        log of the probability vector that defines the true score), both ``(B, K, *spatial)``.
    """
    one_hot = F.one_hot(codes.long(), classes).movedim(-1, 1).float()
    shape = (-1,) + (1,) * (one_hot.dim() - 1)
    tau, mix = taus.view(shape).float(), mixes.view(shape).float()
    alpha = torch.log((1 - mix) * one_hot + mix / classes)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    y = torch.log_softmax((alpha + gumbel) / tau, 1)
    target = torch.log_softmax(alpha - tau * y, 1)
    return y, target


def denoising_loss(network, codes, image, levels, config: SegQCConfig,
                   uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel KL ``(B, *spatial)`` and the denoiser's clean-label log-posterior
    ``(B, K, *spatial)`` for maps ``codes (B, *spatial)`` with images ``(B, C, *spatial)`` at
    ``levels (B,)``.

    Parametrisation: the network returns logits of ``pi = P(clean label | y, image)`` and the
    model's score vector is the posterior mixture ``q = sum_c pi_c softmax(alpha_c - tau y)``,
    which is the form of the optimal denoiser (the true score's probability vector averaged
    over the clean label). The network only has to recognise the clean label, and the loss can
    reach zero where the image determines it.
    """
    schedule = config.schedule
    taus = schedule.taus.to(codes.device)[levels]
    mixes = schedule.mixes.to(codes.device)[levels]
    y, target = noisy_labels(codes, taus, mixes, config.classes, uniform)
    log_pi = torch.log_softmax(network(torch.cat([y, image], 1), taus).float(), 1)
    k = config.classes
    spatial = (1,) * (y.dim() - 2)
    eye = torch.eye(k, device=y.device)
    alpha = torch.log((1 - mixes.view(-1, 1, 1)) * eye + mixes.view(-1, 1, 1) / k)  # (B, c, K)
    candidates = torch.log_softmax(
        alpha.view(*alpha.shape, *spatial) - taus.view(-1, 1, 1, *spatial) * y[:, None], 2)
    log_q = torch.logsumexp(log_pi[:, :, None] + candidates, dim=1)
    return (target.exp() * (target - log_q)).sum(1), log_pi


@dataclass
class QCResult:
    """One map's QC: ``score`` (higher = more likely wrong), ``percentile`` among the good
    validation maps (100 = worse than all of them), ``per_level`` (L,) class-balanced losses,
    ``voxel_map`` ``(X, Y, Z)`` float32 on the model grid (loss summed over levels, nats)."""

    score: float
    percentile: float
    per_level: np.ndarray
    voxel_map: np.ndarray
    seconds: float = 0.0
    readouts: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"qc_score": self.score, "percentile_among_good": self.percentile,
                "per_level": [float(v) for v in self.per_level], "seconds": self.seconds}


def class_balanced_mean(loss: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over tissue classes of the mean ``loss`` over voxels that ``labels`` or
    ``predicted`` assign to the class (classes absent from both are skipped)."""
    means = []
    for k in TISSUE_CLASSES:
        region = (labels == k) | (predicted == k)
        if region.any():
            means.append(float(loss[region].mean()))
    return float(np.mean(means)) if means else 0.0


def soft_dice_error(codes: torch.Tensor, posterior: torch.Tensor) -> float:
    """``1 -`` mean over tissue classes of the soft Dice between a map ``codes (*spatial)``
    and a per-voxel class posterior ``(K, *spatial)`` (classes absent from both skipped)."""
    scores = []
    for k in TISSUE_CLASSES:
        mask = (codes == k).float()
        total = float(mask.sum() + posterior[k].sum())
        if total > 0:
            scores.append(2.0 * float((mask * posterior[k]).sum()) / total)
    return 1.0 - float(np.mean(scores)) if scores else 0.0


@dataclass
class SegQCModel:
    config: SegQCConfig
    network: ScoreUNet
    good_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # sorted, validation
    info: dict = field(default_factory=dict)

    def check_inputs(self, labels: np.ndarray, image: np.ndarray) -> None:
        shape = tuple(self.config.shape)
        if labels.shape != shape:
            raise InputError(f"label map has shape {labels.shape}, the model grid is {shape}")
        if image.shape != (self.config.image_channels, *shape):
            raise InputError(f"image has shape {image.shape}, expected "
                             f"{(self.config.image_channels, *shape)}")
        if labels.min() < 0 or labels.max() >= self.config.classes:
            raise InputError(f"labels must be 0..{self.config.classes - 1} (0 background, "
                             f"1 CSF, 2 GM, 3 WM); found {int(labels.min())}..{int(labels.max())}")

    @torch.inference_mode()
    def score_map(self, labels: np.ndarray, image: np.ndarray, brain_mask: np.ndarray | None
                  = None, device: str | torch.device = "cpu") -> QCResult:
        """QC of one model-space map ``labels (X, Y, Z)`` with its image ``(C, X, Y, Z)``
        (normalised as by preprocessing, -1 outside the brain); ``brain_mask`` widens the
        evaluated box."""
        start = time.perf_counter()
        labels = np.asarray(labels)
        image = np.asarray(image, np.float32)
        self.check_inputs(labels, image)
        config = self.config
        network = self.network.to(device).eval()
        # evaluated box: the map's foreground, the image's brain (preprocessing sets -1
        # outside it) and the brain mask if given
        region = (labels > 0) | (image[0] > -0.999)
        if brain_mask is not None:
            region = region | np.asarray(brain_mask, bool)
        box = crop_around(region, margin=4, multiple=2 ** (len(config.channels) - 1))
        codes = torch.as_tensor(labels[box].astype(np.int64), device=device)[None]
        picture = torch.as_tensor(image[(slice(None), *box)], device=device)[None]
        per_voxel, predicted, dice_errors = [], None, []
        for level in range(config.num_levels):
            generator = torch.Generator().manual_seed(10_007 * (level + 1) + config.seed)
            uniform = torch.rand((1, config.classes, *config.shape), generator=generator)
            uniform = uniform[(slice(None), slice(None), *box)].to(device)
            loss, log_pi = denoising_loss(network, codes, picture,
                                          torch.tensor([level], device=device), config, uniform)
            per_voxel.append(loss[0].cpu().numpy())
            dice_errors.append(soft_dice_error(codes[0], log_pi[0].exp()))
            if level == 0:
                predicted = log_pi[0].argmax(0).cpu().numpy()
        cropped_labels = labels[box]
        per_level = np.array([class_balanced_mean(v, cropped_labels, predicted)
                              for v in per_voxel])
        voxel_map = np.zeros(config.shape, np.float32)
        voxel_map[box] = np.sum(per_voxel, axis=0)
        readouts = {"top_level_kl": float(per_level[0]),
                    "class_balanced_kl": float(per_level.sum()),
                    "plain_mean_kl": float(np.sum(per_voxel, axis=0).mean()),
                    "soft_dice_error": float(np.sum(dice_errors)),
                    "top_level_dice_error": 1.0 - mean_dice(cropped_labels, predicted),
                    "top_level_soft_dice_error": dice_errors[0]}
        score = readouts[config.readout]
        return QCResult(score, self.percentile(score), per_level, voxel_map,
                        time.perf_counter() - start, readouts)

    def percentile(self, score: float) -> float:
        """Percent of good validation maps scoring below ``score`` (NaN without calibration)."""
        if not len(self.good_scores):
            return float("nan")
        return float(100.0 * np.searchsorted(self.good_scores, score, side="left")
                     / len(self.good_scores))

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        return save_checkpoint(
            path, MODEL_KIND, asdict(self.config), {"network": self.network.state_dict()},
            {"good_scores": [float(s) for s in self.good_scores], "info": self.info},
            overwrite=overwrite)

    @staticmethod
    def load(path: str | Path) -> SegQCModel:
        checkpoint = load_checkpoint(path, kind=MODEL_KIND)
        config = SegQCConfig(**checkpoint["config"])
        network = config.network()
        network.load_state_dict(checkpoint["states"]["network"])
        network.eval()
        extra = checkpoint["extra"]
        return SegQCModel(config, network, np.sort(np.asarray(extra["good_scores"], float)),
                          extra.get("info", {}))


@dataclass
class TrainingMap:
    """One good map for training: ``labels (X, Y, Z)`` integers, ``image (C, X, Y, Z)``."""

    id: str
    labels: np.ndarray
    image: np.ndarray


def _deformed_crop(item: TrainingMap, lo: list[int], size: int, config: SegQCConfig,
                   generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``size``^3 crop at ``lo`` resampled through a random scaling about its centre plus a
    smooth displacement field (cubic upsampling of a 4^3 Gaussian control grid); labels by
    nearest neighbour, image channels linearly; sampled from the whole map, so no borders."""
    from scipy.ndimage import map_coordinates, zoom

    def uniform(low, high, shape=()):
        return low + (high - low) * torch.rand(shape, generator=generator).numpy()

    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"))
    centre = (size - 1) / 2.0
    scale = 1.0 + float(uniform(-config.scale_jitter, config.scale_jitter))
    coords = centre + (grid - centre) * scale
    if config.deform_voxels > 0:
        control = torch.randn((3, 4, 4, 4), generator=generator).numpy() * config.deform_voxels
        coords = coords + np.stack([zoom(c, size / 4, order=3) for c in control])
    coords = coords + np.asarray(lo, np.float32)[:, None, None, None]
    labels = map_coordinates(item.labels, coords, order=0, mode="nearest")
    image = np.stack([map_coordinates(channel, coords, order=1, mode="nearest")
                      for channel in item.image]).astype(np.float32)
    return labels.astype(item.labels.dtype), image


def _random_crops(maps: list[TrainingMap], config: SegQCConfig, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, P, P, P)`` label crops and ``(B, C, P, P, P)`` image crops centred on random
    brain voxels, with random left-right flips and image intensity jitter."""
    labels, images = [], []
    size = config.crop
    for _ in range(config.batch_size):
        item = maps[int(torch.randint(len(maps), (1,), generator=generator))]
        brain = np.argwhere(item.labels > 0)
        centre = brain[int(torch.randint(len(brain), (1,), generator=generator))]
        lo = [int(np.clip(c - size // 2, 0, s - size))
              for c, s in zip(centre, item.labels.shape, strict=True)]
        box = tuple(slice(a, a + size) for a in lo)
        if config.deform_voxels > 0 or config.scale_jitter > 0:
            crop_labels, crop_image = _deformed_crop(item, lo, size, config, generator)
        else:
            crop_labels = item.labels[box]
            crop_image = item.image[(slice(None), *box)]
        if torch.rand((), generator=generator) < 0.5:
            crop_labels, crop_image = crop_labels[::-1], crop_image[:, ::-1]
        gain = 1 + 0.1 * (2 * float(torch.rand((), generator=generator)) - 1)
        labels.append(torch.as_tensor(crop_labels.astype(np.int64)))
        images.append(torch.as_tensor(np.ascontiguousarray(crop_image) * gain))
    return torch.stack(labels), torch.stack(images)


def train_seg_qc(
    train_maps: list[TrainingMap],
    val_maps: list[TrainingMap],
    config: SegQCConfig,
    *,
    device: str = "cpu",
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
    checkpoint_every: int = 100,
) -> SegQCModel:
    """Train the denoiser on good maps, then store the validation maps' QC scores.

    ``checkpoint_path`` (a ``seg-qc-training`` checkpoint) is written atomically every
    ``checkpoint_every`` steps and on Ctrl-C; ``resume`` continues from it (same config).
    ``log`` receives ``{"step", "loss", "lr", "seconds"}`` every 10 steps.
    """
    from tqdm import tqdm

    from ..training_utils import _flatten_optimizer, _unflatten_optimizer, warmup_cosine

    if not train_maps:
        raise InputError("no training maps")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    network = config.network().to(device)
    optimizer = torch.optim.AdamW(network.parameters(), config.learning_rate)
    step, history = 0, []
    if resume and checkpoint_path and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path, kind=TRAINING_KIND)
        if state["config"] != stored_config(config):
            raise InputError(f"'{checkpoint_path}' was trained with another configuration")
        network.load_state_dict(state["states"]["network"])
        optimizer.load_state_dict(_unflatten_optimizer(state["states"]["optimizer"],
                                                       state["extra"]["optimizer"]))
        generator.set_state(state["states"]["rng"]["generator"])
        step, history = int(state["extra"]["step"]), state["extra"]["history"]

    def save_state() -> None:
        if checkpoint_path is None:
            return
        tensors, plain = _flatten_optimizer(optimizer.state_dict())
        save_checkpoint(checkpoint_path, TRAINING_KIND, asdict(config),
                        {"network": network.state_dict(), "optimizer": tensors,
                         "rng": {"generator": generator.get_state()}},
                        {"step": step, "history": history, "optimizer": plain})

    start = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc="train seg-qc", disable=not progress,
               mininterval=2.0)
    try:
        network.train()
        while step < config.steps:
            factor = warmup_cosine(step, config.warmup_steps, config.steps, 0.05)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * factor
            codes, images = _random_crops(train_maps, config, generator)
            levels = torch.randint(config.num_levels, (len(codes),), generator=generator)
            uniform = torch.rand((len(codes), config.classes, *codes.shape[1:]),
                                 generator=generator)
            loss, _ = denoising_loss(network, codes.to(device), images.to(device),
                                     levels.to(device), config, uniform.to(device))
            loss = loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update(1)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"training diverged at step {step} (loss {loss.item()})")
            if step % 10 == 0:
                entry = {"step": step, "loss": float(loss.item()),
                         "lr": config.learning_rate * factor,
                         "seconds": time.perf_counter() - start}
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                if log:
                    log(entry)
            if step % checkpoint_every == 0:
                save_state()
    except KeyboardInterrupt:
        save_state()
        raise
    finally:
        bar.close()
    save_state()
    network.eval()
    model = SegQCModel(config, network.cpu(), info={"history": history[-200:]})
    scores = [model.score_map(m.labels, m.image).score for m in
              tqdm(val_maps, desc="calibrate", disable=not progress)]
    model.good_scores = np.sort(np.asarray(scores, float))
    model.info.update({"train_ids": [m.id for m in train_maps],
                       "val_ids": [m.id for m in val_maps], "steps": step})
    return model

