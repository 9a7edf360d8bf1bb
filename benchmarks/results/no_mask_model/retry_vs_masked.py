"""Criterion 2 of RETRY_RULE.md (run at commit ead28d7, where the retry exists): for each scan
cached without its mask (``<id>_atlasmask``), the mean and max distance (mm) between where its
cached mapping and its registration with its own brain mask put the template brain's points.

Usage: python retry_vs_masked.py MODEL COHORT_DIR CACHE_DIR ID [ID ...]
"""
import json
import sys

import numpy as np

from SpatialMSMALib import preprocessing
from SpatialMSMALib.io import load_volume
from SpatialMSMALib.model import AnomalyModel
from SpatialMSMALib.registration import n4_bias_correction
from SpatialMSMALib.template import template_on_grid

model = AnomalyModel.load(sys.argv[1])
config = model.preprocess_config()
template = template_on_grid(config.spacing_mm, config.shape)
grid_affine = template.grid.affine
points = np.argwhere(template.brain_mask)[::50] @ grid_affine[:3, :3].T + grid_affine[:3, 3]
points = np.c_[points, np.ones(len(points))]
cohort, cache = sys.argv[2], sys.argv[3]
out = {}
for scan_id in sys.argv[4:]:
    with np.load(f"{cache}/{scan_id}_atlasmask_{config.spacing_mm:g}mm.npz") as stored:
        mapping = preprocessing.SpaceMapping.from_dict(json.loads(str(stored["mapping"])))
    t1 = load_volume(f"{cohort}/{scan_id}_t1.nii.gz")
    mask = load_volume(f"{cohort}/{scan_id}_brainmask.nii.gz").data > 0
    affine = np.asarray(t1.affine, float)
    corrected = n4_bias_correction(np.asarray(t1.data, np.float32), affine, mask)[0]
    reference = preprocessing.register_to_template(template, corrected, affine, mask,
                                                   config.registration, [],
                                                   version=config.version)
    distance = np.linalg.norm((points @ mapping.model_to_native.T)[:, :3]
                              - (points @ reference.T)[:, :3], axis=1)
    out[scan_id] = {"mean_mm": round(float(distance.mean()), 2),
                    "max_mm": round(float(distance.max()), 2),
                    "gate_ncc": mapping.registration_ncc}
    print(scan_id, out[scan_id], flush=True)
print(json.dumps(out, indent=1))
