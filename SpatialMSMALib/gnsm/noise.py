"""Gumbel (ExpConcrete) noise for categorical variables and its closed-form score.

A categorical value with ``K`` categories is a one-hot vector; its logits are
``alpha = log(clip(onehot, eps, 1))``. Noise at temperature ``tau`` draws

    y = log_softmax((alpha + g) / tau),   g ~ Gumbel(0, 1) i.i.d.,

an ExpConcrete(alpha, tau) sample (Maddison et al., 2017): the log of a Concrete / Gumbel-softmax
sample, living on ``{y : logsumexp(y) = 0}``. Its log-density (relative to the symmetric
measure ``prod_k dx_k / x_k`` on the simplex, ``x = exp(y)``: ``exp(-y_K) dy_1..dy_{K-1}``) is

    log p(y) = log (K-1)! + (K-1) log tau + sum_k (alpha_k - tau y_k)
               - K logsumexp(alpha - tau y),

so the score is ``d log p / d y = tau * (K * softmax(alpha - tau y) - 1)``: a function of the
probability vector ``q = softmax(alpha - tau y)`` alone. The score network therefore predicts
logits ``l`` and its score is ``tau * (K softmax(l) - 1)``; denoising score matching is
``KL(q || softmax(l))`` (zero exactly when the predicted score equals the noisy-sample score).

Numeric columns use Gaussian noise ``x + sigma z`` with score ``-z / sigma``. Both schedules
share one level index ``0..L-1`` (index 0 = most noise: largest tau and sigma).

All functions are pure torch; shapes are ``(..., K)`` for one categorical variable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class GumbelNoiseSchedule:
    """``num_levels`` temperatures geometric from ``tau_max`` to ``tau_min``, category mixing
    weights geometric from ``mix_max`` to ``mix_min``, and Gaussian sigmas (standardised units)
    geometric from ``sigma_max`` to ``sigma_min``, all on one index (0 = most noise).

    Mixing: the logits at level ``l`` are ``alpha = log((1 - m_l) onehot + m_l / K)``. With
    ``m = 0`` (the published choice, ``alpha = log(clip(onehot, 1e-5, 1))``) the Gumbel-max
    category ``argmax(alpha + g)`` is the true one with probability ``1 - (K-1) 1e-5`` at every
    temperature (the temperature rescales ``y`` but never changes its argmax), so the noise
    never hides a value and the denoiser needs no other column: its scores carry little
    information about whether a row's combination of values is usual. With ``m_l > 0`` a value
    is replaced by a random category with probability ``m_l (K-1)/K`` (up to the Gumbel
    perturbation), and undoing that needs the other columns, i.e. the joint distribution.
    """

    tau_max: float = 20.0
    tau_min: float = 2.0
    sigma_max: float = 1.0
    sigma_min: float = 0.1
    num_levels: int = 20
    mix_max: float = 0.5
    mix_min: float = 1e-3

    def __post_init__(self):
        if not (0 < self.tau_min < self.tau_max and 0 < self.sigma_min < self.sigma_max):
            raise ValueError("need 0 < tau_min < tau_max and 0 < sigma_min < sigma_max")
        if not 0 < self.mix_min <= self.mix_max < 1:
            raise ValueError("need 0 < mix_min <= mix_max < 1")
        if self.num_levels < 2:
            raise ValueError("num_levels must be at least 2")

    def _geometric(self, high: float, low: float) -> torch.Tensor:
        return torch.logspace(math.log10(high), math.log10(low), self.num_levels)

    @property
    def taus(self) -> torch.Tensor:
        """``(L,)`` float32, descending."""
        return self._geometric(self.tau_max, self.tau_min)

    @property
    def mixes(self) -> torch.Tensor:
        """``(L,)`` float32, descending."""
        return self._geometric(self.mix_max, self.mix_min)

    @property
    def sigmas(self) -> torch.Tensor:
        """``(L,)`` float32, descending."""
        return self._geometric(self.sigma_max, self.sigma_min)

    def to_dict(self) -> dict:
        return asdict(self)


def mixed_logits(one_hot: torch.Tensor, mix: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``alpha = log((1 - mix) one_hot + mix / K)``.

    Args:
        one_hot: ``(..., C, Kmax)`` (padding slots 0).
        mix: broadcastable to ``(..., 1, 1)``.
        slots: ``(C,)`` number of real slots ``K`` of each column (padding slots get
            ``log(0) = -inf``; callers mask them).
    """
    real = torch.arange(one_hot.shape[-1], device=one_hot.device) < slots[:, None]
    return torch.log((1 - mix) * one_hot + (mix / slots[:, None]) * real)


def sample_exp_concrete(
    alpha: torch.Tensor, tau: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ExpConcrete sample ``y = log_softmax((alpha + g) / tau)``.

    Args:
        alpha: ``(..., K)`` logits.
        tau: temperature, broadcastable to ``alpha[..., :1]`` (e.g. ``(B, 1)``).
    """
    uniform = torch.rand(alpha.shape, generator=generator, device=alpha.device,
                         dtype=alpha.dtype).clamp_(1e-10, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(uniform))
    return torch.log_softmax((alpha + gumbel) / tau, dim=-1)


def exp_concrete_log_density(
    y: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """Log-density of ExpConcrete(alpha, tau) at ``y (..., K)`` (tau 0-dim or ``(..., 1)``),
    relative to the measure in the module docstring; returns ``(...)``."""
    k = y.shape[-1]
    log_tau = torch.log(torch.as_tensor(tau, dtype=y.dtype)).expand_as(y[..., :1]).squeeze(-1)
    return (
        math.lgamma(k)
        + (k - 1) * log_tau
        + (alpha - tau * y).sum(-1)
        - k * torch.logsumexp(alpha - tau * y, dim=-1)
    )


def exp_concrete_score(y: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Closed-form ``d log p(y) / d y = tau (K softmax(alpha - tau y) - 1)``, ``(..., K)``."""
    k = y.shape[-1]
    return tau * (k * torch.softmax(alpha - tau * y, dim=-1) - 1.0)
