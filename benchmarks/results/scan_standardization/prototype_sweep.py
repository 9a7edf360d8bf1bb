"""Prototype (not part of the library; kept to reproduce the README's table): per-scan
normalisation variants of the component maps, calibrated on the val maps and evaluated on
the dev maps (native grid, the bundled post-processing)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from SpatialMSMALib.dataset import manifest_scans, model_space
from SpatialMSMALib.detection import native_detection, relabel
from SpatialMSMALib.io import load_volume
from SpatialMSMALib.metrics import evaluate_operating_point, split_summary
from SpatialMSMALib.model import AnomalyModel
from SpatialMSMALib.normative import fused_heat
from SpatialMSMALib.spatial import Calibration

M = AnomalyModel.load("/work/main/Resources/Models/spatial_msma.pt")
VAL = [Path("/tmp/w/psn/maps_aug_val"), Path("/tmp/w/psn/maps_bench_val")]


def load(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.npz")):
        with np.load(f) as z:
            out[f.stem] = (z["flow"], z["norm"], z["region"])
    return out


def stats(h, r, kind):
    v = h[r]
    v = v[np.isfinite(v)]
    q = np.percentile(v, [25, 50, 75, 90])
    return q


def transform(variant, maps, ref):
    """maps: (flow, norm, region) -> (flow', norm')"""
    flow, norm, r = maps
    if variant == "none":
        return flow, norm
    out = []
    for h, k in ((flow, 0), (norm, 1)):
        q = stats(h, r, k)
        rq = ref[k]
        if variant == "shift":
            out.append(h - (q[1] - rq[1]))
        elif variant == "robust":
            s, rs = q[2] - q[0], rq[2] - rq[0]
            out.append((h - q[1]) / s * rs + rq[1])
        elif variant == "shift90":
            out.append(h - (q[3] - rq[3]))
        elif variant == "mixed":  # flow: robust z; contrast distance: ratio to the median
            if k == 0:
                s, rs = q[2] - q[0], rq[2] - rq[0]
                out.append((h - q[1]) / s * rs + rq[1])
            else:
                out.append(h / q[1] * rq[1])
        elif variant == "ratio_norm":
            out.append(h / q[1] * rq[1] if k == 1 else h)
        elif variant == "robust_flow":
            if k == 0:
                s, rs = q[2] - q[0], rq[2] - rq[0]
                out.append((h - q[1]) / s * rs + rq[1])
            else:
                out.append(h)
        elif variant == "shift_flow":
            out.append(h - (q[1] - rq[1]) if k == 0 else h)
        elif variant == "shift_norm":
            out.append(h - (q[1] - rq[1]) if k == 1 else h)
    return tuple(out)


def calibrate(variant, vals):
    ref = None
    if variant != "none":
        qs = [[stats(m[k], m[2], k) for m in vals] for k in (0, 1)]
        ref = [np.median(np.array(q), axis=0) for q in qs]
    tr = [transform(variant, m, ref) for m in vals]
    s = dict(smoothing_mm=2.0, rim_mm=4.0)
    comp = {
        name: Calibration.from_healthy([t[k][m[2]] for t, m in zip(tr, vals, strict=False)], **s)
        for k, name in enumerate(("flow", "normative"))
    }
    fused = [fused_heat(t[0], t[1], comp["flow"], comp["normative"]) for t in tr]
    cal = Calibration.from_healthy(
        [f[m[2]] for f, m in zip(fused, vals, strict=False)],
        default_fpr=0.005,
        min_component_ml=0.3,
        grow_rate_factor=3.0,
        max_peak_fpr=None,
        **s,
    )
    return ref, comp, cal


def evaluate(variant, ref, comp, cal, manifest, cache, mapsdir, splits, rates):
    holder = SimpleNamespace(calibration=cal, heat_units="fused", component_calibrations=comp)
    rows = manifest_scans(manifest, splits)
    allrows = [r for s in splits for r in rows[s]]
    scans = {
        s.id: s
        for s in model_space(
            allrows,
            cache,
            M.spacing_mm,
            demons=M.demons,
            version=M.preprocess_version,
            channels=2,
            progress=False,
            refused=[],
        )
    }
    cases = {r: [] for r in rates}
    for row in allrows:
        if row.id not in scans:
            continue
        with np.load(Path(mapsdir) / f"{row.id}.npz") as z:
            maps = (z["flow"], z["norm"], z["region"])
        f, n = transform(variant, maps, ref)
        heat = fused_heat(f, n, comp["flow"], comp["normative"])
        brain = load_volume(row.brain_mask, what="b").data > 0
        truth = load_volume(row.lesion_mask, what="t", allow_empty=True)
        det = native_detection(holder, heat, scans[row.id].mapping, brain)
        for rate in rates:
            d = relabel(det, holder, fpr=rate)
            c = evaluate_operating_point(d.labels > 0, truth.data > 0, truth.spacing)
            c["id"] = row.id
            cases[rate].append(c)
    out = {}
    for rate in rates:
        s = split_summary(cases[rate])
        out[rate] = (
            s.get("pooled_tpr_lesions_ge_0.5ml"),
            s.get("lesioned", {}).get("pooled_ppv"),
            s.get("healthy", {}).get("median_flagged_ml"),
            cases[rate],
        )
    return out


if __name__ == "__main__":
    variants = sys.argv[1].split(",")
    targets = sys.argv[2:]  # name:manifest:cache:mapsdir:splits
    vals = [m for d in VAL for m in load(d).values()]
    rates = (0.01, 0.007, 0.005, 0.004, 0.003, 0.002, 0.0015, 0.001)
    res = {}
    for v in variants:
        ref, comp, cal = calibrate(v, vals)
        for t in targets:
            name, manifest, cache, mapsdir, splits = t.split(":")
            for sp in splits.split(","):
                r = evaluate(
                    v,
                    ref,
                    comp,
                    cal,
                    manifest,
                    cache,
                    mapsdir,
                    (sp + "_healthy", sp + "_lesioned"),
                    rates,
                )
                for rate in rates:
                    tpr, ppv, hm, cs = r[rate]
                    print(
                        f"{v:10s} {name}/{sp} {rate:.3f}: TPR>=0.5 {tpr:.3f} PPV {ppv:.3f} "
                        f"healthy {hm:.2f} mL",
                        flush=True,
                    )
                    res[f"{v}|{name}|{sp}|{rate}"] = {
                        "tpr": tpr,
                        "ppv": ppv,
                        "healthy": hm,
                        "cases": [
                            {
                                k: c[k]
                                for k in (
                                    "id",
                                    "n_truth",
                                    "n_detected",
                                    "n_pred",
                                    "n_pred_true",
                                    "flagged_ml",
                                )
                            }
                            for c in cs
                        ],
                    }
    json.dump(
        res, open("/tmp/w/psn/res_" + "_".join(variants) + ".json", "w"), indent=1, default=float
    )
