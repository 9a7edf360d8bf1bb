"""Per-noise-level separation of lesion and healthy brain voxels by score-norm features.

    python benchmarks/feature_separation.py --checkpoint runs/score/best.pt --manifest benchmark
        [--n-scans 2] [--split test_lesioned]

For each lesioned scan: preprocess (given brain mask), compute the local score-norm features
with the EMA weights, map the lesion mask into model space, and report the voxel AUROC inside
the brain of each sigma's feature (higher norm = more anomalous). This is raw evidence of how
much signal a training budget has produced, not a detector (no healthy reference here).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from SpatialMSMALib.checkpoint import load_checkpoint
from SpatialMSMALib.cohort import load_manifest
from SpatialMSMALib.io import load_volume
from SpatialMSMALib.metrics import voxel_auroc_auprc
from SpatialMSMALib.preprocessing import preprocess_scan
from SpatialMSMALib.score import score_norm_features
from SpatialMSMALib.score.training import CHECKPOINT_KIND, ScoreTrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--split", default="test_lesioned")
    parser.add_argument("--n-scans", type=int, default=2)
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint, kind=CHECKPOINT_KIND)
    config = ScoreTrainConfig(**checkpoint["config"])
    model = config.build_model(checkpoint["extra"]["in_channels"]).eval()
    model.load_state_dict(checkpoint["states"]["ema"])
    sigmas = config.schedule().sigmas
    manifest = load_manifest(args.manifest)
    root = Path(manifest["root"])
    rows = []
    for s in [s for s in manifest["subjects"] if s["split"] == args.split][: args.n_scans]:
        result = preprocess_scan(load_volume(root / s["t1"]), load_volume(root / s["t2"]),
                                 load_volume(root / s["brain_mask"]))
        lesion = load_volume(root / s["lesion_mask"], allow_empty=True).data
        lesion_model = result.mapping.to_model(lesion.astype(np.uint8), order=0) > 0
        local, _ = score_norm_features(model, torch.from_numpy(result.image), sigmas)
        aurocs = [voxel_auroc_auprc(local[i].numpy(), lesion_model, result.brain_mask)[0]
                  for i in range(len(sigmas))]
        intensity = [voxel_auroc_auprc(result.image[c], lesion_model, result.brain_mask)[0]
                     for c in range(result.image.shape[0])]
        rows.append({"id": s["id"], "step": checkpoint["extra"]["step"],
                     "auroc_per_sigma": [round(a, 3) for a in aurocs],
                     "intensity_auroc_t1_t2": [round(a, 3) for a in intensity]})
        print(json.dumps(rows[-1]))
    mean = np.nanmean([r["auroc_per_sigma"] for r in rows], axis=0)
    print("sigmas", [round(float(x), 4) for x in sigmas])
    print("mean AUROC per sigma", [round(float(x), 3) for x in mean])


if __name__ == "__main__":
    main()
