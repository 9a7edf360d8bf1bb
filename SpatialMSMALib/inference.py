"""The one inference path shared by the CLI, the Slicer module and the browser viewer.

``prepare`` brings native scans into model space, ``compute_features`` runs the score model,
``assess_typicality`` turns a scan into MSMA typicality scores. Each step reports progress
through an optional ``progress(message, fraction)`` callback and can be cancelled by raising
from it (the GUIs raise ``Cancelled``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .io import Volume
from .model import AnomalyModel
from .preprocessing import WARN_NCC, PreprocessedScan, preprocess_scan
from .score.features import score_norm_features

Progress = Callable[[str, float], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop the work."""


def select_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; also ``cpu``, ``cuda`` and ``cuda:N``.
    Anything else, or a CUDA device this machine lacks, is refused with a clear message."""
    device = str(device).strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    index = device.removeprefix("cuda:") if device.startswith("cuda:") else None
    if device != "cuda" and not (index is not None and index.isdigit()):
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, not '{device}'")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but no CUDA device is available")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s), numbered from 0")
    return torch.device(device)


@contextmanager
def full_precision() -> Iterator[None]:
    """IEEE float32 convolutions and matrix products inside the block (no autocast, even
    inside a caller's, and no TF32 on CUDA), the previous settings restored after it.
    Score-norm features are computed this way on every device: the density models fitted on
    them are sensitive to 1% changes of the norms (under bf16 autocast on a CPU, 3 of 6
    benchmark scans changed their MSMA verdict; ``benchmarks/feature_precision.py``), so no
    device may add a precision loss of its own. (The score network's own GroupNorm is exact on
    the CPU's channels-last tensors too: ``score.network.AccurateGroupNorm``.)"""
    settings = _float32_settings()
    saved = [getattr(owner, name) for owner, name, _ in settings]
    try:
        for owner, name, value in settings:
            setattr(owner, name, value)
        with ExitStack() as stack:
            for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        for (owner, name, _), value in zip(settings, saved, strict=True):
            setattr(owner, name, value)


def _float32_settings() -> list[tuple[object, str, object]]:
    """``(owner, attribute, IEEE value)`` of torch's TF32 switches: the ``fp32_precision``
    settings of recent torch, else the older ``allow_tf32`` flags (for instance the torch
    that a 3D Slicer installation provides)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        return [(conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]


def prepare(
    model: AnomalyModel,
    t1: Volume,
    t2: Volume | None = None,
    brain_mask: Volume | None = None,
    *,
    names: dict | None = None,
    progress: Progress | None = None,
) -> PreprocessedScan:
    """Preprocess onto the model's grid; refuses inputs missing a channel the model needs."""
    names = names or {}
    if len(model.channel_names) == 2 and t2 is None:
        raise InputError(
            f"this model was trained on T1 + T2; give the T2 of '{names.get('t1', 'the scan')}'"
        )
    if len(model.channel_names) == 1:
        t2 = None
    return preprocess_scan(t1, t2, brain_mask, model.preprocess_config(), names=names,
                           progress=lambda m, f: progress(m, 0.3 * f) if progress else None)


def compute_features(
    model: AnomalyModel,
    scan: PreprocessedScan,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    levels: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score-norm features of a preprocessed scan: ``local (L, X, Y, Z)`` float32 (zero
    outside the brain's bounding box) and ``whole (L,)`` (norm over the model-space brain
    mask); with ``levels`` (noise-level indices) only those levels, in that order
    (``(len(levels), ...)``). Computed in IEEE float32 on every device
    (:func:`full_precision`; no autocast): the typicality and flow models read these
    values."""
    device = torch.device(device)
    net = model.score_net.to(device)
    x = torch.from_numpy(scan.image).to(device)
    f = model.features
    sigmas = model.sigmas if levels is None else model.sigmas[list(levels)]
    if not len(sigmas):  # nothing reads score norms: no network pass
        return (np.zeros((0, *scan.image.shape[1:]), np.float32), np.zeros(0, np.float32))
    chunks = [sigmas[i : i + f.sigmas_per_pass] for i in range(0, len(sigmas), f.sigmas_per_pass)]
    local_parts, whole_parts = [], []
    for index, chunk in enumerate(chunks):
        if progress:
            progress(f"score model, noise levels {index * f.sigmas_per_pass + 1}-"
                     f"{index * f.sigmas_per_pass + len(chunk)} of {len(sigmas)}",
                     0.3 + 0.65 * index / len(chunks))
        with full_precision():
            local, whole = score_norm_features(net, x, chunk, f.neighbourhood, len(chunk),
                                               mask=scan.brain_mask, margin=f.margin)
        local_parts.append(local.float().cpu())
        whole_parts.append(whole.float().cpu())
    return torch.cat(local_parts).numpy(), torch.cat(whole_parts).numpy()


def detection_levels(model: AnomalyModel) -> list[int]:
    """The noise levels a detection must evaluate: all when the flow reads score norms (or
    the model has no flow), else those its typicality model reads (all without a level
    choice; none without a typicality model)."""
    every = list(range(len(model.sigmas)))
    if model.spatial is None or model.spatial.config.score_features:
        return every
    if model.typicality is None:
        return []
    return every if model.typicality.levels is None else list(model.typicality.levels)


def full_levels(model: AnomalyModel, levels: list[int], whole: np.ndarray) -> np.ndarray:
    """``(L,)`` whole-brain norms with ``whole`` at ``levels`` and NaN at the levels that
    were not evaluated (a typicality model reads only its own levels)."""
    out = np.full(len(model.sigmas), np.nan, np.float32)
    out[list(levels)] = whole
    return out


#: correlation of each model-space channel with the template T1 inside the brain, as measured
#: on the 50 healthy train/val scans of the default benchmark cohort: T1 0.40 to 0.71, T2
#: -0.62 to -0.20. A channel on the wrong side of these limits is not the contrast the model
#: expects (most often T1 and T2 given the wrong way round).
T1_MIN_CORRELATION = 0.1
T2_MAX_CORRELATION = 0.0


def contrast_problems(model: AnomalyModel, image: np.ndarray, brain_mask: np.ndarray,
                      names: dict | None = None) -> list[str]:
    """Messages for channels whose contrast is not what the model was trained on, from the
    correlation of each model-space channel ``image (C, X, Y, Z)`` with the template T1
    inside ``brain_mask``. Empty when the input looks right."""
    from .template import template_on_grid

    names = names or {}
    template = template_on_grid(model.spacing_mm, tuple(model.shape))
    mask = np.asarray(brain_mask, bool) & template.brain_mask
    problems = []
    for channel, name in zip(image, model.channel_names, strict=False):
        r = float(np.corrcoef(channel[mask], template.t1[mask])[0, 1])
        label = f"{name} '{names[name.lower()]}'" if names.get(name.lower()) else name
        if name == "T1" and not r >= T1_MIN_CORRELATION:
            problems.append(f"{label} does not look T1-weighted (correlation with the T1 "
                            f"template {r:.2f}, expected >= {T1_MIN_CORRELATION}); are T1 and "
                            "T2 the right way round?")
        if name == "T2" and not r <= T2_MAX_CORRELATION:
            # a FLAIR in the T2 slot lands here too (CSF dark as in a T1): about 1 L flagged
            # on FLAIR-like copies of demo subjects, correlation 0.10 and 0.29
            # (benchmarks/flair_as_t2.py)
            problems.append(f"{label} does not look T2-weighted (correlation with the T1 "
                            f"template {r:.2f}, expected <= {T2_MAX_CORRELATION}): the model "
                            "needs a T2-weighted scan, with bright CSF. Is it a FLAIR (dark "
                            "CSF), or are T1 and T2 the wrong way round?")
    return problems


def cached_features(
    model: AnomalyModel,
    scans,
    feature_dir: Path,
    device: str | torch.device = "cpu",
    *,
    save_local: bool = False,
    progress_bar: bool = True,
) -> tuple[np.ndarray, list[Path]]:
    """Whole-brain score norms ``(N, L)`` of model-space scans, read from or written to
    ``feature_dir/<scan id>.npz`` (atomically). With ``save_local`` the ``(L, X, Y, Z)``
    local maps are stored as float16 too (a cached file without them is recomputed).
    Returns the vectors and the cache files, in the order of ``scans``."""
    from tqdm import tqdm

    feature_dir = Path(feature_dir)
    feature_dir.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    for scan in tqdm(scans, desc="score-norm features", disable=not progress_bar):
        path = feature_dir / f"{scan.id}.npz"
        paths.append(path)
        if path.exists():
            with np.load(path) as cached:
                if not save_local or "local" in cached:
                    rows.append(cached["whole"])
                    continue
        local, whole = compute_features(model, scan, device)
        arrays = {"whole": whole}
        if save_local:
            arrays["local"] = local.astype(np.float16)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        rows.append(whole)
    return np.stack(rows), paths


@dataclass
class TypicalityReport:
    scores: dict  # aux model name -> Assessment.to_dict()
    verdict: str  # verdict of the primary auxiliary model
    primary: str
    registration_ncc: float
    warnings: list
    whole_features: list

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "primary_model": self.primary,
            "scores": self.scores,
            "registration_ncc": self.registration_ncc,
            "warnings": self.warnings,
            "score_norms": self.whole_features,
        }


#: an input voxel edge longer than this multiple of the model grid's spacing is coarser than
#: any scan the bundled models were trained and calibrated on (1-2 mm); 5% absorbs the
#: rounding of headers that store, say, 2.0000001 mm
COARSE_VOXEL_TOLERANCE = 1.05


def coarse_voxel_warnings(volumes: dict, grid_spacing_mm: float,
                          names: dict | None = None) -> list[str]:
    """One warning per input whose voxels are coarser than the model grid on some axis,
    typically a 2D acquisition with thick slices (a 1 x 1 x 5 mm T2).

    Such a scan is interpolated onto the grid, so it lacks the detail of the scans the model
    was trained and calibrated on: its healthy tissue is flagged more often than the stated
    rate, and the scan-level verdict moves towards atypical (measured on thick-slice copies
    of the demo subjects: ``benchmarks/thick_slices.py``). ``detection.detect`` and
    :func:`assess_typicality` still run and report these messages with their warnings.

    Args:
        volumes: ``{"t1": Volume, "t2": Volume or None}`` as given to ``detect``
            (each with a voxel -> RAS mm ``affine``).
        grid_spacing_mm: the model grid's voxel size (mm).
        names: file names for the messages (``{"t1": ..., "t2": ...}``).
    Returns:
        the messages, T1 first; empty when every input is fine enough.
    """
    names = names or {}
    messages = []
    for key, what in (("t1", "T1"), ("t2", "T2")):
        volume = volumes.get(key)
        if volume is None:
            continue
        spacing = np.asarray(volume.spacing, float)
        if spacing.max() <= COARSE_VOXEL_TOLERANCE * grid_spacing_mm:
            continue
        label = f"{what} '{names[key]}'" if names.get(key) else what
        size = " x ".join(f"{s:.1f}" for s in spacing)
        messages.append(
            f"{label} has voxels of {size} mm, coarser than the model's {grid_spacing_mm:g} mm "
            "grid (thick slices?), so its detail is interpolated. The bundled models were "
            "trained and calibrated on scans of 2 mm or finer: expect more healthy tissue "
            "flagged than the stated rate and a less reliable scan-level verdict, and check "
            "small findings against the images.")
    return messages


def assess_typicality(
    model: AnomalyModel,
    t1: Volume,
    t2: Volume | None = None,
    brain_mask: Volume | None = None,
    *,
    primary: str = "gmm",
    device: str | torch.device = "cpu",
    names: dict | None = None,
    progress: Progress | None = None,
) -> TypicalityReport:
    """Scan-level MSMA: every auxiliary model's score and percentile against the healthy
    reference; the verdict is the primary model's. A registration of doubtful quality is
    reported as a warning (a failed one is refused by preprocessing)."""
    if model.typicality is None:
        raise InputError("this model file carries no MSMA typicality model")
    if primary not in model.typicality.models:
        raise InputError(f"auxiliary model '{primary}' not in this model file "
                         f"(has {sorted(model.typicality.models)})")
    scan = prepare(model, t1, t2, brain_mask, names=names, progress=progress)
    levels = (list(range(len(model.sigmas))) if model.typicality.levels is None
              else list(model.typicality.levels))
    _, whole = compute_features(model, scan, device, progress, levels)
    whole = full_levels(model, levels, whole)
    report = typicality_report(model, whole, scan.mapping.registration_ncc,
                               contrast_problems(model, scan.image, scan.brain_mask, names),
                               primary, progress)
    report.warnings += coarse_voxel_warnings(
        {"t1": t1, "t2": t2 if len(model.channel_names) == 2 else None}, model.spacing_mm,
        names)
    return report


def typicality_report(model: AnomalyModel, whole: np.ndarray, registration_ncc: float,
                      problems: list[str], primary: str = "gmm",
                      progress: Progress | None = None) -> TypicalityReport:
    """Typicality scores of whole-brain score norms ``(L,)`` (NaN at levels that were not
    evaluated; the typicality model must not read those). Contrast problems make the verdict
    "unexpected input" whatever the scores say: such a scan is never called typical."""
    scores = {name: model.typicality.assess(whole[None], name)[0].to_dict()
              for name in model.typicality.models}
    if primary not in scores:
        primary = next(iter(scores))
    warnings = list(problems)
    ncc = float(registration_ncc)
    if ncc < WARN_NCC:
        warnings.append(f"registration to the template is doubtful (NCC {ncc:.2f}); is this "
                        "a T1-weighted brain MRI?")
    if progress:
        progress("done", 1.0)
    verdict = "unexpected input" if problems else scores[primary]["verdict"]
    return TypicalityReport(scores, verdict, primary, ncc, warnings,
                            [float(v) if np.isfinite(v) else None for v in whole])
