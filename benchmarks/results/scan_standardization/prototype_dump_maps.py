"""Prototype (not part of the library): dump the bundled model's component heat maps
(model grid) for scans of a cohort."""

import sys
import time
from pathlib import Path

import numpy as np

from SpatialMSMALib.dataset import manifest_scans, model_space
from SpatialMSMALib.detection import component_heat_maps
from SpatialMSMALib.model import AnomalyModel
from SpatialMSMALib.spatial import scored_region

model_path, manifest, cache, out = sys.argv[1:5]
splits = tuple(sys.argv[5].split(","))
out = Path(out)
out.mkdir(parents=True, exist_ok=True)
model = AnomalyModel.load(model_path)
rows = manifest_scans(manifest, splits)
allrows = [r for s in splits for r in rows[s]]
refused = []
scans = model_space(
    allrows,
    cache,
    model.spacing_mm,
    demons=model.demons,
    version=model.preprocess_version,
    channels=len(model.channel_names),
    refused=refused,
)
print("refused", refused, flush=True)
no_norms = np.zeros((0, *model.shape), np.float32)
for scan in scans:
    f = out / f"{scan.id}.npz"
    if f.exists():
        continue
    t0 = time.perf_counter()
    flow, norm = component_heat_maps(model, scan.image, scan.brain_mask, no_norms)
    region = scored_region(scan.brain_mask, model.calibration.rim_mm, model.spacing_mm)
    np.savez(f, flow=flow.astype(np.float32), norm=norm.astype(np.float32), region=region)
    print(scan.id, f"{time.perf_counter() - t0:.1f}s", flush=True)
