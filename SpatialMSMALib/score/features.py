"""Score-norm features (MSMA): per-voxel and whole-input norms of sigma * s(x, sigma).

The score is evaluated at the clean input x for every noise level (as the reference methods
do: the features measure how far x is from the data manifold as seen at each scale).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .network import score_with_origin

#: version of the numbers :func:`score_norm_features` gives for the same network and scan; it
#: names feature caches, so a change never reuses stale ones. 2 (2026-12-01): exact GroupNorm
#: on the CPU's channels-last tensors (version 1 features were up to ~1.6% off there).
FEATURE_VERSION = 2


def crop_around(mask: np.ndarray, margin: int, multiple: int = 4) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels on every side, then grown further
    (inside the array where possible) until every side length is a multiple of ``multiple``
    (so the network needs no internal padding). Returns one slice per axis."""
    coords = np.nonzero(mask)
    if not coords[0].size:
        return tuple(slice(0, s) for s in mask.shape)
    slices = []
    for axis, size in enumerate(mask.shape):
        lo = max(0, int(coords[axis].min()) - margin)
        hi = min(size, int(coords[axis].max()) + 1 + margin)
        extra = (-(hi - lo)) % multiple
        grow_hi = min(extra, size - hi)
        hi += grow_hi
        lo = max(0, lo - (extra - grow_hi))
        slices.append(slice(lo, hi))
    return tuple(slices)


@torch.inference_mode()
def score_norm_features(
    score_fn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    neighbourhood: int = 3,
    sigmas_per_pass: int = 2,
    mask: np.ndarray | torch.Tensor | None = None,
    margin: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one input.

    Args:
        score_fn: callable ``(x (B, C, *spatial), sigma (B,)) -> (B, C, *spatial)``; a
            position-aware ``ScoreUNet`` also gets the evaluated box's grid origin.
        x: one input ``(C, *spatial)`` (2D or 3D), the whole model grid.
        sigmas: ``(L,)`` noise levels.
        neighbourhood: k of the k^d neighbourhood over which per-voxel norms are pooled (L2).
        sigmas_per_pass: noise levels evaluated together in one batched forward pass (bounds
            memory).
        mask: optional region of interest ``(*spatial)`` (the brain). The network then runs
            only on the mask's bounding box grown by ``margin`` voxels (background beyond it
            is constant; at 2 mm this halves the work), ``local`` is zero outside that box,
            and ``whole`` sums over the mask only.
    Returns:
        ``(local, whole)``: ``local`` of shape ``(L, *spatial)`` = L2 norm over the k^d
        neighbourhood of the per-voxel L2 norm across channels of ``sigma_i * s(x, sigma_i)``;
        ``whole`` of shape ``(L,)`` = L2 norm of ``sigma_i * s(x, sigma_i)`` over the mask
        (everything without a mask).
    """
    spatial_dims = x.dim() - 1
    full_shape = tuple(x.shape[1:])
    region = tuple(slice(0, s) for s in full_shape)
    mask_t = None
    if mask is not None:
        mask_np = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, bool)
        if mask_np.shape != full_shape:
            raise ValueError(f"mask shape {mask_np.shape} != input shape {full_shape}")
        region = crop_around(mask_np, margin)
        mask_t = torch.from_numpy(mask_np[region]).to(x.device)
    x = x[(slice(None),) + region]
    squared = []
    for start in range(0, len(sigmas), sigmas_per_pass):
        chunk = sigmas[start : start + sigmas_per_pass].to(x.device, x.dtype)
        batch = x.unsqueeze(0).expand(len(chunk), *x.shape)
        if spatial_dims == 3:  # oneDNN's channels-last 3D convolutions: ~1.6x on 2 cores
            batch = batch.contiguous(memory_format=torch.channels_last_3d)
        origin = [r.start for r in region]
        scale = chunk.view((-1,) + (1,) * (spatial_dims + 1))
        scaled = score_with_origin(score_fn, batch, chunk, origin) * scale
        squared.append(scaled.float().pow(2).sum(dim=1))  # (l, *crop)
    per_voxel_sq = torch.cat(squared)  # (L, *crop)
    if mask_t is None:
        whole = per_voxel_sq.flatten(1).sum(1).sqrt()
    else:
        whole = per_voxel_sq[:, mask_t].sum(1).sqrt()
    pool = F.avg_pool3d if spatial_dims == 3 else F.avg_pool2d
    local_sq = pool(
        per_voxel_sq.unsqueeze(1),
        neighbourhood,
        stride=1,
        padding=neighbourhood // 2,
        count_include_pad=True,
    ).squeeze(1)
    local_crop = (local_sq * neighbourhood**spatial_dims).clamp_min(0).sqrt()
    if mask_t is None:
        return local_crop, whole
    local = torch.zeros((len(sigmas),) + full_shape, dtype=local_crop.dtype, device=x.device)
    local[(slice(None),) + region] = local_crop
    return local, whole


@torch.inference_mode()
def whole_score_norms(
    score_fn,
    images: torch.Tensor,
    sigmas: torch.Tensor,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "score norms",
) -> torch.Tensor:
    """Whole-input MSMA features of many small inputs (2D images, crops).

    Args:
        score_fn: callable ``(x (B, C, *spatial), sigma (B,)) -> (B, C, *spatial)``.
        images: ``(N, C, *spatial)``.
        sigmas: ``(L,)`` noise levels.
        batch_size: inputs per forward pass (each pass evaluates one noise level).
    Returns:
        ``(N, L)``: ``||sigma_i * s(x_n, sigma_i)||_2`` over all channels and positions.
    """
    from tqdm import tqdm

    device = next(score_fn.parameters()).device if hasattr(score_fn, "parameters") else "cpu"
    out = torch.empty(len(images), len(sigmas))
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc=desc):
        batch = images[start : start + batch_size].to(device)
        for i, sigma in enumerate(sigmas.tolist()):
            sigma_batch = torch.full((len(batch),), sigma, device=device, dtype=batch.dtype)
            scaled = score_fn(batch, sigma_batch) * sigma
            out[start : start + len(batch), i] = scaled.float().flatten(1).norm(dim=1).cpu()
    return out
