"""Score-norm features (MSMA): per-voxel and whole-input norms of sigma * s(x, sigma).

The score is evaluated at the clean input x for every noise level (as the reference methods
do: the features measure how far x is from the data manifold as seen at each scale).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


@torch.inference_mode()
def score_norm_features(
    score_fn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    neighbourhood: int = 3,
    sigmas_per_pass: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one input.

    Args:
        score_fn: callable ``(x (B, C, *spatial), sigma (B,)) -> (B, C, *spatial)``.
        x: one input ``(C, *spatial)`` (2D or 3D).
        sigmas: ``(L,)`` noise levels.
        neighbourhood: k of the k^d neighbourhood over which per-voxel norms are pooled (L2).
        sigmas_per_pass: noise levels evaluated together in one batched forward pass (bounds
            memory).
    Returns:
        ``(local, whole)``: ``local`` of shape ``(L, *spatial)`` = L2 norm over the k^d
        neighbourhood of the per-voxel L2 norm across channels of ``sigma_i * s(x, sigma_i)``;
        ``whole`` of shape ``(L,)`` = L2 norm of ``sigma_i * s(x, sigma_i)`` over everything.
    """
    spatial_dims = x.dim() - 1
    squared = []
    for start in range(0, len(sigmas), sigmas_per_pass):
        chunk = sigmas[start : start + sigmas_per_pass].to(x.device, x.dtype)
        batch = x.unsqueeze(0).expand(len(chunk), *x.shape)
        scaled = score_fn(batch, chunk) * chunk.view((-1,) + (1,) * (spatial_dims + 1))
        squared.append(scaled.float().pow(2).sum(dim=1))  # (l, *spatial)
    per_voxel_sq = torch.cat(squared)  # (L, *spatial)
    whole = per_voxel_sq.flatten(1).sum(1).sqrt()
    pool = F.avg_pool3d if spatial_dims == 3 else F.avg_pool2d
    local_sq = pool(
        per_voxel_sq.unsqueeze(1),
        neighbourhood,
        stride=1,
        padding=neighbourhood // 2,
        count_include_pad=True,
    ).squeeze(1)
    local = (local_sq * neighbourhood**spatial_dims).clamp_min(0).sqrt()
    return local, whole
