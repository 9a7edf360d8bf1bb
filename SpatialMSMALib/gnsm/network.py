"""Noise-conditional score network for mixed tabular rows: a residual MLP with FiLM.

Input per row: the noisy categorical log-probabilities ``y (C, Kmax)`` (padding slots zero)
flattened, and the noisy standardised numeric values ``(M,)``. The noise level enters as a
learned embedding of its index that scales and shifts every block (FiLM). Outputs: categorical
logits ``(C, Kmax)`` (padding slots masked to -inf by the caller) and, for numeric columns,
``sigma * score`` (the noise-scaled score, the NCSN preconditioning: the target is ``-z``).
"""

from __future__ import annotations

import torch
from torch import nn


class FiLMResidualBlock(nn.Module):
    """``h + W2 GELU(FiLM(LayerNorm(W1 h)))``; FiLM = ``(1 + scale) * x + shift``."""

    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.outer = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.inner(h))
        return h + self.outer(nn.functional.gelu(x * (1 + scale) + shift))


class TabularScoreNetwork(nn.Module):
    """Residual MLP over one row; ``forward(y, numeric, level)`` with shapes
    ``(B, C, Kmax)``, ``(B, M)`` and ``level`` ``(B,)`` int64 (one level per row) or a Python
    int (one level for the whole batch, cheaper) -> logits ``(B, C, Kmax)``, ``(B, M)``."""

    def __init__(self, num_categorical: int, max_slots: int, num_numeric: int,
                 num_levels: int, width: int = 128, blocks: int = 3):
        super().__init__()
        self.num_categorical, self.max_slots = num_categorical, max_slots
        self.num_numeric = num_numeric
        inputs = num_categorical * max_slots + num_numeric
        self.stem = nn.Linear(inputs, width)
        self.level_embedding = nn.Embedding(num_levels, 2 * width * blocks)
        nn.init.zeros_(self.level_embedding.weight)
        self.blocks = nn.ModuleList(FiLMResidualBlock(width) for _ in range(blocks))
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, inputs)

    def forward(self, y: torch.Tensor, numeric: torch.Tensor, level: torch.Tensor):
        batch = y.shape[0]
        h = self.stem(torch.cat([y.reshape(batch, -1), numeric], dim=1))
        if isinstance(level, int):
            film = self.level_embedding.weight[level].view(1, len(self.blocks), 2, -1)
        else:
            film = self.level_embedding(level).view(batch, len(self.blocks), 2, -1)
        for i, block in enumerate(self.blocks):
            h = block(h, film[:, i, 0], film[:, i, 1])
        out = self.head(nn.functional.gelu(self.head_norm(h)))
        split = self.num_categorical * self.max_slots
        logits = out[:, :split].view(batch, self.num_categorical, self.max_slots)
        return logits, out[:, split:]
