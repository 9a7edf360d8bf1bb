"""The one inference path shared by the CLI, the Slicer module and the browser viewer.

``prepare`` brings native scans into model space, ``compute_features`` runs the score model,
``assess_typicality`` turns a scan into MSMA typicality scores. Each step reports progress
through an optional ``progress(message, fraction)`` callback and can be cancelled by raising
from it (the GUIs raise ``Cancelled``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .io import Volume
from .model import AnomalyModel
from .preprocessing import WARN_NCC, PreprocessConfig, PreprocessedScan, preprocess_scan
from .score.features import score_norm_features

Progress = Callable[[str, float], None]


class Cancelled(Exception):
    """Raised by a progress callback to stop the work."""


def select_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


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
    config = PreprocessConfig(spacing_mm=model.spacing_mm, shape=tuple(model.shape))
    return preprocess_scan(t1, t2, brain_mask, config, names=names,
                           progress=lambda m, f: progress(m, 0.3 * f) if progress else None)


def compute_features(
    model: AnomalyModel,
    scan: PreprocessedScan,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Score-norm features of a preprocessed scan: ``local (L, X, Y, Z)`` float32 (zero
    outside the brain's bounding box) and ``whole (L,)`` (norm over the model-space brain
    mask). Uses bf16 autocast on CUDA."""
    device = torch.device(device)
    net = model.score_net.to(device)
    x = torch.from_numpy(scan.image).to(device)
    f = model.features
    sigmas = model.sigmas
    chunks = [sigmas[i : i + f.sigmas_per_pass] for i in range(0, len(sigmas), f.sigmas_per_pass)]
    local_parts, whole_parts = [], []
    for index, chunk in enumerate(chunks):
        if progress:
            progress(f"score model, noise levels {index * f.sigmas_per_pass + 1}-"
                     f"{index * f.sigmas_per_pass + len(chunk)} of {len(sigmas)}",
                     0.3 + 0.65 * index / len(chunks))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            local, whole = score_norm_features(net, x, chunk, f.neighbourhood, len(chunk),
                                               mask=scan.brain_mask, margin=f.margin)
        local_parts.append(local.float().cpu())
        whole_parts.append(whole.float().cpu())
    return torch.cat(local_parts).numpy(), torch.cat(whole_parts).numpy()


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
    _, whole = compute_features(model, scan, device, progress)
    scores = {name: model.typicality.assess(whole[None], name)[0].to_dict()
              for name in model.typicality.models}
    warnings = []
    ncc = float(scan.mapping.registration_ncc)
    if ncc < WARN_NCC:
        warnings.append(f"registration to the template is doubtful (NCC {ncc:.2f}); is this "
                        "a T1-weighted brain MRI?")
    if progress:
        progress("done", 1.0)
    return TypicalityReport(scores, scores[primary]["verdict"], primary, ncc, warnings,
                            whole.tolist())
