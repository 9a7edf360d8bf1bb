"""Geometric noise schedule sigma_1 > ... > sigma_L (NCSN convention: index 0 is largest)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

#: default range for data normalised to about [-1, 1] inside the brain (preprocessing maps the
#: 1st-99th percentiles to -1..+1): the smallest sigma is below the noise level of the scans,
#: the largest exceeds the data range several times.
DEFAULT_SIGMA_MIN = 0.01
DEFAULT_SIGMA_MAX = 2.0
DEFAULT_NUM_LEVELS = 20


@dataclass(frozen=True)
class GeometricNoiseSchedule:
    """``num_levels`` noise levels, geometrically spaced from ``sigma_max`` down to
    ``sigma_min`` (units of the normalised intensities)."""

    sigma_min: float = DEFAULT_SIGMA_MIN
    sigma_max: float = DEFAULT_SIGMA_MAX
    num_levels: int = DEFAULT_NUM_LEVELS

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )
        if self.num_levels < 2:
            raise ValueError("num_levels must be at least 2")

    @property
    def sigmas(self) -> torch.Tensor:
        """Shape ``(L,)``, float32, descending."""
        return torch.logspace(
            torch.log10(torch.tensor(self.sigma_max)),
            torch.log10(torch.tensor(self.sigma_min)),
            self.num_levels,
        )

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random level per sample (uniform over levels): sigmas of shape ``(B,)``."""
        index = torch.randint(0, self.num_levels, (batch_size,), generator=generator)
        return self.sigmas[index]

    def to_dict(self) -> dict:
        return asdict(self)
