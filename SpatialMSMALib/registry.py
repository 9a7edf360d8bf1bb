"""Where the bundled models live and what their registry says; no torch import, so the
command line can read it while it builds its help."""

from __future__ import annotations

import json
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"
#: describes the bundled models: file, sha256, channels, resolution, training data, costs
REGISTRY = MODEL_DIR / "registry.json"


def bundled_models() -> list[dict]:
    """Entries of the bundled model registry (empty when none is installed)."""
    if not REGISTRY.exists():
        return []
    return json.loads(REGISTRY.read_text())["models"]


def bundled_operating_points() -> str:
    """One line naming each bundled detection model's default voxel false-positive rate
    (and the growth of its components), read from the registry; empty without one. Used in
    ``spatial-msma detect --help`` so the help follows the models shipped."""
    points = []
    for entry in bundled_models():
        calibration = entry.get("calibration") or {}
        if "default_voxel_fpr" not in calibration:
            continue
        name = " + ".join(entry["channels"])
        name += " (no mask)" if entry.get("brain_masks") == "atlas" else ""
        point = f"{name}: {calibration['default_voxel_fpr']:g}"
        if calibration.get("grow_rate_factor"):
            point += f", components grown to {calibration['grow_rate_factor']:g}x that rate"
        points.append(point)
    return "; ".join(points)
