"""Simple QC baselines on model-space label maps (higher score = more likely wrong).

- :class:`VolumeZScore`: each tissue class's volume against the good training maps; score =
  root mean square of the per-class z-scores.
- :class:`AtlasDice`: one minus the mean tissue Dice between the map and an atlas: the
  voxel-wise majority label of the good training maps (all are in the same MNI-aligned model
  space, so this is "Dice to atlas after registration").
"""

from __future__ import annotations

import numpy as np

from .corruptions import TISSUE_LABELS, mean_dice


class VolumeZScore:
    name = "volume z-score"

    def fit(self, label_maps: list[np.ndarray]) -> VolumeZScore:
        volumes = np.array([self._volumes(m) for m in label_maps])  # (N, 3) voxels
        self.mean, self.scale = volumes.mean(0), volumes.std(0) + 1e-6
        return self

    @staticmethod
    def _volumes(labels: np.ndarray) -> np.ndarray:
        return np.array([(labels == label).sum() for label in TISSUE_LABELS], np.float64)

    def score(self, labels: np.ndarray) -> float:
        z = (self._volumes(labels) - self.mean) / self.scale
        return float(np.sqrt(np.mean(z**2)))


class AtlasDice:
    name = "Dice to atlas"

    def fit(self, label_maps: list[np.ndarray]) -> AtlasDice:
        counts = np.stack([sum((m == label).astype(np.uint16) for m in label_maps)
                           for label in (0, *TISSUE_LABELS)])
        self.atlas = counts.argmax(0).astype(np.uint8)
        return self

    def score(self, labels: np.ndarray) -> float:
        return 1.0 - mean_dice(self.atlas, labels)
