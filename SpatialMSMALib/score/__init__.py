"""Noise-conditional score models: noise schedule, loss, network and score-norm features.

The schedule, the loss and the network are separate objects; features take a network and a
schedule.
"""

from .features import score_norm_features, whole_score_norms
from .loss import denoising_score_matching_loss
from .network import ScoreUNet
from .schedule import GeometricNoiseSchedule

__all__ = [
    "GeometricNoiseSchedule",
    "ScoreUNet",
    "denoising_score_matching_loss",
    "score_norm_features",
    "whole_score_norms",
]
