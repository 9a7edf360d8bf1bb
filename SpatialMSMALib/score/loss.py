"""Denoising score matching with the usual sigma^2 weighting (Song & Ermon, 2019)."""

from __future__ import annotations

import torch


def denoising_score_matching_loss(
    score_fn, x: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of ``0.5 * sigma^2 * ||s(x + sigma z, sigma) + z / sigma||^2``.

    The squared norm is averaged over channels and voxels (not summed) so that the value does
    not depend on the crop size.

    Args:
        score_fn: callable ``(x_noisy (B, C, *spatial), sigma (B,)) -> score (B, C, *spatial)``.
        x: clean data ``(B, C, *spatial)``.
        sigmas: ``(B,)`` noise level per sample.
        noise: optional standard normal ``z`` of the shape of ``x`` (drawn when ``None``).
    Returns:
        scalar loss.
    """
    if noise is None:
        noise = torch.randn_like(x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    sigma = sigmas.to(x.dtype).view(shape)
    score = score_fn(x + sigma * noise, sigmas)
    residual = sigma * score + noise  # = sigma * (score - target), target = -noise / sigma
    return 0.5 * residual.pow(2).flatten(1).mean(1).mean()
