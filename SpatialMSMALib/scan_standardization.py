"""Per-scan standardisation of a component heat map before calibration.

Why: on healthy validation scans the *whole* of a component map moves from scan to scan. The
bundled model's flow NLL has a per-scan median between -9.0 and -4.8 nats, and the normative
contrast distance one between 0.8 and 3.4, with each scan's upper tail moving with its median
(20 healthy calibration scans). One healthy-voxel calibration pooled over such scans is then
set by the scans whose maps are high everywhere, and a lesion in a quiet scan must clear that
threshold.

The rule maps each scan's distribution inside the scored region onto a reference one (the
medians over the calibration scans of the per-scan statistics) before the voxel-wise
calibration:

- ``"robust"``: ``(heat - median) / IQR * IQR_ref + median_ref`` (for maps with an arbitrary
  offset, such as an NLL in nats);
- ``"ratio"``: ``heat / median * median_ref`` (for non-negative maps whose spread grows with
  their level, such as a squared distance).

A focal lesion occupies far less than 1% of the scored region, so it barely moves a scan's
median or IQR. A diffuse change of the whole brain is removed by design: that is the job of
the scan-level MSMA verdict, and the report gives each scan's factors.

Measured on two dev cohorts (``benchmarks/results/scan_standardization/``): the ratio rule on
the contrast map finds a few more lesions at matched operating points; standardising the
flow's map does not help; neither removes the unseen anatomy's false positives, whose tails
are not a change of scale.

Coordinates: heat maps and regions are ``(X, Y, Z)`` on the model grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

RULES = ("robust", "ratio")


def scan_statistics(heat: np.ndarray, region: np.ndarray) -> dict:
    """``{"median", "iqr"}`` of the finite values of ``heat`` inside ``region``."""
    values = np.asarray(heat, np.float64)[np.asarray(region, bool)]
    values = values[np.isfinite(values)]
    if values.size < 100:
        raise ValueError(f"{values.size} scored voxels are too few to standardise a scan")
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return {"median": float(q50), "iqr": float(q75 - q25)}


@dataclass
class ScanStandardization:
    """One component map's per-scan rule and its reference statistics.

    Attributes:
        rule: ``"robust"`` or ``"ratio"`` (module docstring).
        reference_median, reference_iqr: medians over the calibration scans of their own
            median and IQR inside the scored region (the map's units).
        n_scans: how many scans gave the reference.
    """

    rule: str
    reference_median: float
    reference_iqr: float
    n_scans: int = 0

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"scan standardisation rule must be one of {RULES}, got "
                             f"{self.rule!r}")
        if not self.reference_iqr > 0:
            raise ValueError(f"reference IQR must be positive, got {self.reference_iqr}")
        if self.rule == "ratio" and not self.reference_median > 0:
            raise ValueError("the ratio rule needs a positive reference median, got "
                             f"{self.reference_median}")

    @classmethod
    def fit(cls, rule: str, heats: Sequence[np.ndarray], regions: Sequence[np.ndarray]
            ) -> ScanStandardization:
        """Reference statistics from the calibration scans' maps (one per scan)."""
        stats = [scan_statistics(h, r) for h, r in zip(heats, regions, strict=True)]
        return cls(rule, float(np.median([s["median"] for s in stats])),
                   float(np.median([s["iqr"] for s in stats])), len(stats))

    def apply(self, heat: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, dict]:
        """The standardised map (same shape, NaN kept) and this scan's statistics with the
        applied ``scale`` (reference units per map unit) and ``offset``."""
        stats = scan_statistics(heat, region)
        if self.rule == "robust":
            scale = self.reference_iqr / max(stats["iqr"], 1e-6 * self.reference_iqr)
            offset = self.reference_median - stats["median"] * scale
        else:
            if not stats["median"] > 0:
                raise ValueError(f"the ratio rule needs a positive scan median, got "
                                 f"{stats['median']}")
            scale, offset = self.reference_median / stats["median"], 0.0
        out = (np.asarray(heat, np.float32) * np.float32(scale) + np.float32(offset))
        return out.astype(np.float32), {**stats, "scale": float(scale), "offset": float(offset)}

    def to_dict(self) -> dict:
        return asdict(self)


def parse_rules(text: str, has_normative: bool) -> dict[str, str]:
    """``--scan-standardization`` value -> ``{"flow": rule[, "normative": rule]}``: ``none``
    (no standardisation: ``{}``), ``FLOW_RULE`` (the flow's map only) or
    ``FLOW_RULE,NORMATIVE_RULE``; each rule ``robust``, ``ratio`` or ``none``."""
    parts = [p.strip() for p in str(text).split(",")]
    if parts == ["none"]:
        return {}
    if len(parts) > 2 or any(p not in RULES + ("none",) for p in parts):
        raise ValueError(f"scan standardisation must be 'none', FLOW_RULE or "
                         f"FLOW_RULE,NORMATIVE_RULE with rules in {RULES + ('none',)}, "
                         f"got {text!r}")
    if len(parts) == 2 and not has_normative and parts[1] != "none":
        raise ValueError(f"scan standardisation {text!r} names a rule for the normative "
                         "contrast map, but this model has none")
    rules = dict(zip(("flow", "normative"), parts, strict=False))
    return {name: rule for name, rule in rules.items() if rule != "none"}
