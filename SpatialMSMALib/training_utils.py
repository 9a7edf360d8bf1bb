"""Small pieces shared by the training engines (score model, Spatial-MSMA flow)."""

from __future__ import annotations

import math
import os


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``floor`` at
    ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def training_device(device: str = "auto") -> str:
    """``auto`` -> CUDA when available; under torchrun each process takes the GPU of its
    ``LOCAL_RANK`` (and makes it current)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device
