"""How visible are the benchmark's lesions at all? An oracle bound by lesion contrast.

    python benchmarks/contrast_bound.py --manifest benchmark --cache CACHE --fields FIELDS_DIR \\
        --out results/contrast_bound.json

An oracle that knows each lesion's exact shape and place (the truth mask, demons-registered
to the template like the bundled model's scans) summarises the scan inside it and asks
whether that summary is typical of healthy scans in the same template-space region: the
squared Mahalanobis distance from the cohort's healthy ``train`` scans' summaries in that
region. Summaries (``--summary``):

* ``mean``: the mean T1 and T2 inside the lesion;
* ``contrast``: the mean inside minus the mean in a 2-voxel (4 mm) shell around it;
* ``both``: the four values.

The threshold is label-free: the 99th (and 99.9th) percentile of the same distance for every
lesion region evaluated on the healthy scans of the split (and the healthy ``val`` scans for
the test split), i.e. 1% of healthy lesion-shaped regions flagged. Reported: the fraction of
lesions >= 0.5 mL found, split into faint ones (``flow_inputs.is_faint``) and the others.
It bounds what a detector can reach from intensities when it must also find the place and
the shape; it is not a detector. Figures on the 2 mm model grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_inputs import (  # noqa: E402
    SPACING_MM,
    Deformable,
    large_lesions_on_model_grid,
    load_scan,
)

from SpatialMSMALib.cohort import load_manifest  # noqa: E402
from SpatialMSMALib.dataset import manifest_scans  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import load_volume  # noqa: E402
from SpatialMSMALib.preprocessing import SpaceMapping  # noqa: E402
from SpatialMSMALib.registration import warp  # noqa: E402

SHELL_VOX = 2
RATES = (0.01, 0.001)


def region_summary(image: np.ndarray, mask: np.ndarray, kind: str,
                   shell: np.ndarray) -> np.ndarray:
    """Summary of ``image`` ``(C, X, Y, Z)`` (NaN outside the brain) in ``mask``: the
    channel means (``mean``), means minus those of ``shell`` (``contrast``), or both."""
    inside = np.nanmean(image[:, mask], axis=1)
    if kind == "mean":
        return inside
    contrast = inside - np.nanmean(image[:, shell], axis=1)
    return contrast if kind == "contrast" else np.concatenate([inside, contrast])


def squared_distances(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances of ``values`` ``(N, D)`` from ``reference`` ``(M, D)``."""
    mean = reference.mean(0)
    precision = np.linalg.inv(np.atleast_2d(np.cov(reference.T)))
    diff = values - mean
    return np.einsum("nd,de,ne->n", diff, precision, diff)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="model-space cache of the cohort")
    p.add_argument("--fields", type=Path, required=True, help="demons fields (flow_inputs.py's)")
    p.add_argument("--demons-iterations", type=int, default=100)
    p.add_argument("--demons-smoothing-vox", type=float, default=1.5)
    p.add_argument("--summary", nargs="+", default=["mean", "contrast", "both"],
                   choices=["mean", "contrast", "both"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"error: '{args.out}' exists; pass --overwrite to replace it")
    deform = Deformable(args.demons_iterations, args.demons_smoothing_vox, args.fields)
    subjects = {s["id"]: s for s in load_manifest(args.manifest)["subjects"]}
    names = ("train", "val", "test_healthy", "test_lesioned", "loao_healthy", "loao_lesioned")
    scans = manifest_scans(args.manifest, names)

    def image_of(scan_id):  # template space, NaN outside the brain
        image, brain, *_ = load_scan(args.cache, scan_id, [0.0], deform)
        return np.where(brain, image, np.nan).astype(np.float32)

    def lesions(split):  # (faint, template-space mask, image) per lesion >= 0.5 mL
        out = []
        for row in scans[split]:
            with np.load(args.cache / f"{row.id}_{SPACING_MM:g}mm.npz") as z:
                t1 = z["image"][0]
                mapping = SpaceMapping.from_dict(json.loads(str(z["mapping"])))
            forward, _ = deform.field(args.cache, row.id, t1)
            native = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True)
            image = image_of(row.id)
            for faint, mask in large_lesions_on_model_grid(subjects[row.id],
                                                           native.data > 0, mapping):
                warped = warp(mask.astype(np.float32), forward, order=1) > 0.5
                if warped.any():
                    out.append((faint, warped, image))
        return out

    train = [image_of(row.id) for row in scans["train"]]
    result = {"manifest": str(args.manifest), "n_reference_scans": len(train),
              "shell_vox": SHELL_VOX, "grid": "model grid, 2 mm, demons to the template",
              "splits": {}}
    for split, healthy_splits in (("test", ("test_healthy", "val")),
                                  ("loao", ("loao_healthy",))):
        found = lesions(f"{split}_lesioned")
        healthy = [image_of(row.id) for name in healthy_splits for row in scans[name]]
        faint = np.array([f for f, _, _ in found], bool)
        figures = {"n_lesions_ge_0.5ml": len(found), "n_faint": int(faint.sum()),
                   "n_healthy_scans": len(healthy)}
        for kind in args.summary:
            lesion_d, null_d = [], []
            for _, mask, image in found:
                shell = ndimage.binary_dilation(mask, iterations=SHELL_VOX) & ~mask
                reference = np.stack([region_summary(t, mask, kind, shell) for t in train])
                values = np.stack([region_summary(image, mask, kind, shell)]
                                  + [region_summary(h, mask, kind, shell) for h in healthy])
                d = squared_distances(reference, values)
                lesion_d.append(d[0])
                null_d += list(d[1:])
            lesion_d, null_d = np.array(lesion_d), np.array(null_d)
            figures[kind] = {}
            for rate in RATES:
                threshold = float(np.quantile(null_d, 1 - rate))
                hit = lesion_d > threshold
                figures[kind][str(rate)] = {
                    "threshold": threshold, "tpr_ge_0.5ml": float(hit.mean()),
                    "tpr_faint": float(hit[faint].mean()) if faint.any() else float("nan"),
                    "tpr_other": float(hit[~faint].mean())}
                print(f"{split} {kind:8s} healthy regions flagged {rate:g}: TPR >= 0.5 mL "
                      f"{hit.mean():.2f} (faint {figures[kind][str(rate)]['tpr_faint']:.2f} of "
                      f"{faint.sum()}, others {figures[kind][str(rate)]['tpr_other']:.2f})",
                      flush=True)
        result["splits"][split] = figures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # a bad manifest, cache or model file: one line naming it
        raise SystemExit(f"error: {e}") from None
