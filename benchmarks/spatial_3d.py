"""Spatial-MSMA localisation on the benchmark cohort (PROTOCOLS.md section 1).

    python benchmarks/spatial_3d.py --model runs/spatial_msma.pt --manifest benchmark \\
        [--cache runs/spatial.work/cache] [--out results/spatial_3d.json]

For the held-out test splits (``test_healthy`` + ``test_lesioned``: new subjects of the
training anatomies) and the leave-one-anatomy-out splits (``loao_*``: an anatomy the model
never saw), every scan goes through the detection path (features from the cache when
present), at the model's label-free default threshold (voxel FPR from healthy validation
scans) and fixed post-processing, on the scan's native grid. Metrics per split: Dice, HD99,
MSD (symmetric and ground-truth-to-prediction), component TPR / PPV per volume and pooled,
TPR by lesion size (and for lesions >= 0.5 mL), voxel AUROC / AUPRC of the heat map inside
the brain, and the false-positive burden of healthy scans (flagged mL, components). The
same label-free rule is also swept over voxel FPRs (``--sweep-fprs``, each threshold from the
healthy validation scans alone, post-processing unchanged): the operating curve a user moves
along with the threshold slider, with Dice, TPR / PPV and healthy flagged volume per rate. Costs:
seconds per volume for the flow and for post-processing (features are reported when they
were computed in this run). ``--without-masks`` sets every scan's brain mask aside, as
``detect`` without ``--mask`` does, so a model trained with masks is measured on scans that
have none (a model trained without masks always runs that way).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cohort_args import exit_with, local_norms, native_brain_mask, norm_paths  # noqa: E402

from SpatialMSMALib.dataset import manifest_scans, model_space, without_brain_mask
from SpatialMSMALib.detection import model_heat_map, native_detection, relabel
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.inference import select_device
from SpatialMSMALib.io import load_volume
from SpatialMSMALib.metrics import (
    LARGE_LESION_MM3,
    component_detection,
    detection_metrics,
    evaluate_case,
    evaluate_operating_point,
    split_summary,
)
from SpatialMSMALib.model import AnomalyModel

SPLITS = {"test": ("test_healthy", "test_lesioned"),
          "loao": ("loao_healthy", "loao_lesioned")}
#: voxel false-positive rates of the operating-point sweep (label-free, like the default)
SWEEP_FPRS = (0.01, 0.003, 0.001, 0.0003)


def with_masks_set_aside(model):
    """A copy of ``model`` that preprocesses every scan as ``detect`` prepares one given
    without a brain mask (``brain_masks == "atlas"``: N4 in a head mask, whole-head
    registration, the atlas brain), with the model's own calibration unchanged: how a model
    trained with masks behaves on scans that have none. ``model`` itself is not changed."""
    twin = copy.copy(model)
    twin.brain_masks = "atlas"
    return twin


def evaluate_split(model, rows, cache: Path, device, fpr=None, sweep_fprs=()) -> dict:
    """Every scan of ``rows`` through the detection path. A scan whose registration is
    refused (``RegistrationError``; without its brain mask, for a model with
    ``brain_masks == "atlas"``, some anatomies are) is listed under ``refused`` with the
    reason, with its lesions (``refused_lesions``), and left out of ``cases``."""
    refused: list = []
    scans = model_space(rows, cache, model.spacing_mm, demons=model.demons,
                        brain_masks=model.brain_masks,
                        version=model.preprocess_version,
                        channels=len(model.channel_names), refused=refused)
    reasons = dict(refused)
    cache_ids = [without_brain_mask(r).id if model.brain_masks == "atlas" else r.id
                 for r in rows]
    refused_rows = [r for r, i in zip(rows, cache_ids, strict=True) if i in reasons]
    rows = [r for r, i in zip(rows, cache_ids, strict=True) if i not in reasons]
    for row in refused_rows:
        print(f"{row.id}: refused", flush=True)
    start = time.perf_counter()
    paths = norm_paths(model, scans, cache, device)  # None each for an intensity flow
    feature_seconds = time.perf_counter() - start
    cases, seconds, sweep = [], {"flow": [], "post_process": []}, {}
    for row, scan, path in zip(rows, scans, paths, strict=True):
        local = local_norms(path, scan.brain_mask.shape)
        detection, brain, truth, timing = case_detection(model, row, scan, local, device, fpr)
        for stage, value in timing.items():
            seconds[stage].append(value)
        case = evaluate_case(detection.labels > 0, truth.data > 0, truth.spacing,
                             detection.heat, brain)
        case["id"] = row.id
        in_brain = detection.heat[brain]
        case["heat_p999"] = float(np.percentile(in_brain, 99.9))
        cases.append(case)
        for rate in sweep_fprs:
            moved = relabel(detection, model, fpr=rate)
            sweep.setdefault(rate, []).append(evaluate_operating_point(
                moved.labels > 0, truth.data > 0, truth.spacing))
        print(f"{row.id}: {len(detection.components)} components, "
              f"flagged {case['flagged_ml']:.2f} mL, truth {case['n_truth']} lesions, "
              f"TPR {case['tpr']:.2f} PPV {case['ppv']:.2f} Dice {case['dice']:.3f} "
              f"AUROC {case.get('auroc', float('nan')):.3f}", flush=True)
    refused_records = []
    for row, cache_id in ((r, without_brain_mask(r).id if model.brain_masks == "atlas"
                           else r.id) for r in refused_rows):
        truth = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True)
        lesions = truth.data > 0
        sizes = component_detection(np.zeros_like(lesions), lesions,
                                    truth.spacing)["truth_sizes_mm3"] if lesions.any() else []
        refused_records.append({"id": row.id, "reason": reasons[cache_id],
                                "lesions_mm3": sizes})
    return {"cases": cases, "refused": refused_records,
            "seconds": {k: float(np.median(v)) for k, v in seconds.items()},
            "feature_seconds_total": feature_seconds,
            "operating_points": [operating_point_row(rate, sweep[rate]) for rate in sweep_fprs]}


def case_detection(model, row, scan, local, device="cpu", fpr=None):
    """One benchmark scan through the detection path: the heat map on the model grid from
    the model-space ``scan`` and its local score norms ``local`` ``(L, X, Y, Z)``, then the
    native-grid detection at ``fpr`` (default: the model's). Returns ``(detection, native
    brain mask, truth volume, {"flow": s, "post_process": s})``."""
    t0 = time.perf_counter()
    heat_model = model_heat_map(model, scan.image, scan.brain_mask, local, device)
    timing = {"flow": time.perf_counter() - t0}
    t0 = time.perf_counter()
    brain = native_brain_mask(model, row, scan)
    detection = native_detection(model, heat_model, scan.mapping, brain, fpr=fpr)
    timing["post_process"] = time.perf_counter() - t0
    truth = load_volume(row.lesion_mask, what="lesion mask", allow_empty=True)
    return detection, brain, truth, timing


def operating_point_row(rate: float, cases: list[dict]) -> dict:
    """One row of the sweep: the split's figures at voxel FPR ``rate``."""
    summary = split_summary(cases)
    lesioned = summary.get("lesioned", {})
    return {"voxel_fpr": rate,
            "pooled_lesion_tpr": lesioned.get("pooled_tpr"),
            "pooled_ppv": lesioned.get("pooled_ppv"),
            "pooled_tpr_lesions_ge_0.5ml": summary.get("pooled_tpr_lesions_ge_0.5ml"),
            "dice_mean": lesioned.get("dice", {}).get("mean"),
            "healthy_median_flagged_ml": summary.get("healthy", {}).get("median_flagged_ml"),
            "healthy_mean_false_components": summary.get("healthy", {}).get(
                "mean_false_components")}


def split_summary_with_scan_level(cases: list[dict]) -> dict:
    """``metrics.split_summary`` plus scan-level detection from the heat map (PROTOCOLS.md
    sec. 2)."""
    out = split_summary(cases)
    lesioned = [c for c in cases if not c["healthy"]]
    healthy = [c for c in cases if c["healthy"]]
    if healthy and lesioned:
        labels = np.r_[np.zeros(len(healthy)), np.ones(len(lesioned))]
        out["scan_level"] = {
            name: detection_metrics(np.array([c[key] for c in healthy + lesioned]), labels)
            for name, key in (("heat map 99.9th percentile", "heat_p999"),
                              ("flagged volume", "flagged_ml"))}
    return out


def refused_summary(cases: list[dict], refused: list[dict]) -> dict:
    """How many scans registration refused, and the pooled TPR for lesions >= 0.5 mL with
    every lesion of a refused scan counted as missed (the figures above leave those scans
    out; a user gets no result for them)."""
    sizes = [s for c in cases for s in c["truth_sizes_mm3"]]
    found = [d for c in cases for d in c["truth_detected"]]
    large_found = sum(d for s, d in zip(sizes, found, strict=True) if s >= LARGE_LESION_MM3)
    missed = [s for r in refused for s in r["lesions_mm3"]]
    large = sum(s >= LARGE_LESION_MM3 for s in sizes + missed)
    return {"n_refused": len(refused),
            "pooled_tpr_lesions_ge_0.5ml_refused_as_missed":
                large_found / large if large else None}


def print_table(results: dict) -> None:
    print(f"\n{'split':6s} {'n':>5s} {'TPR':>6s} {'PPV':>6s} {'TPR>=0.5mL':>10s} "
          f"{'Dice':>6s} {'HD99 mm':>8s} {'MSD mm':>7s} {'AUROC':>6s} {'AUPRC':>6s} "
          f"{'healthy mL (median)':>20s}")
    for split, r in results["splits"].items():
        les = r["summary"].get("lesioned", {})

        def mean(key, les=les):
            return les.get(key, {}).get("mean", float("nan"))

        healthy = r["summary"].get("healthy", {}).get("median_flagged_ml", float("nan"))
        large = r["summary"].get("pooled_tpr_lesions_ge_0.5ml")
        print(f"{split:6s} {r['summary']['n_lesioned']:2d}+{r['summary']['n_healthy']:<2d} "
              f"{les.get('pooled_tpr', float('nan')):6.3f} "
              f"{les.get('pooled_ppv', float('nan')):6.3f} "
              f"{large if large is not None else float('nan'):10.3f} {mean('dice'):6.3f} "
              f"{mean('hd99'):8.2f} {mean('msd'):7.2f} {mean('auroc'):6.3f} "
              f"{mean('auprc'):6.3f} {healthy:20.2f}")
    print("TPR/PPV pooled over lesions/components; Dice, HD99, MSD, AUROC, AUPRC: mean over "
          "lesioned volumes; threshold: model default (label-free)")
    for split, r in results["splits"].items():
        if not r.get("operating_points"):
            continue
        print(f"\n{split}: label-free operating points (threshold from healthy validation "
              "scans at each voxel FPR; same post-processing)")
        print(f"{'voxel FPR':>9s} {'TPR':>6s} {'PPV':>6s} {'TPR>=0.5mL':>10s} {'Dice':>6s} "
              f"{'healthy mL (median)':>20s}")
        for row in r["operating_points"]:
            def value(key, row=row):
                v = row.get(key)
                return float("nan") if v is None else v
            print(f"{row['voxel_fpr']:9.4f} {value('pooled_lesion_tpr'):6.3f} "
                  f"{value('pooled_ppv'):6.3f} {value('pooled_tpr_lesions_ge_0.5ml'):10.3f} "
                  f"{value('dice_mean'):6.3f} {value('healthy_median_flagged_ml'):20.2f}")
    for split, r in results["splits"].items():
        for name, m in r["summary"].get("scan_level", {}).items():
            print(f"{split}: scan-level healthy vs lesioned from the {name}: AUROC "
                  f"{m['auroc']:.3f}, AUPRC {m['auprc']:.3f}, FPR95 {m['fpr95']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--limit", type=int, help="first N scans of each split (quick runs)")
    parser.add_argument("--fpr", type=float, help="voxel FPR (default: the model's)")
    parser.add_argument("--sweep-fprs", type=float, nargs="*", default=list(SWEEP_FPRS),
                        help="voxel FPRs of the operating-point sweep (none: no sweep)")
    parser.add_argument("--without-masks", action="store_true",
                        help="set every scan's brain mask aside (as detect without --mask), "
                             "for a model trained with masks; an atlas model always does")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for rate in ([args.fpr] if args.fpr is not None else []) + list(args.sweep_fprs):
        if not 0 < rate < 1:
            parser.error(f"voxel false-positive rates are fractions in (0, 1), got {rate}")
    model = AnomalyModel.load(args.model)
    trained_with = model.brain_masks
    if args.without_masks:
        model = with_masks_set_aside(model)
    device = select_device(args.device)
    results = {"model": str(args.model), "provenance": model.provenance,
               "brain_masks": trained_with, "masks_set_aside": model.brain_masks == "atlas",
               "calibration": {"default_fpr": model.calibration.default_fpr,
                               "threshold": model.calibration.default_threshold,
                               "smoothing_mm": model.calibration.smoothing_mm,
                               "min_component_ml": model.calibration.min_component_ml,
                               "max_peak_fpr": model.calibration.max_peak_fpr,
                               "grow_rate_factor": model.calibration.grow_rate_factor},
               "machine": {"cpu_threads": torch.get_num_threads(), "device": str(device),
                           "platform": platform.platform()},
               "splits": {}}
    for split in args.splits:
        names = SPLITS[split]
        rows_by_split = manifest_scans(args.manifest, names)
        rows = [r for name in names for r in rows_by_split[name][: args.limit]]
        r = evaluate_split(model, rows, args.cache, device, args.fpr, args.sweep_fprs)
        r["summary"] = split_summary_with_scan_level(r["cases"])
        r["summary"].update(refused_summary(r["cases"], r["refused"]))
        results["splits"][split] = r
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # a missing model or manifest: the message, not a traceback
        exit_with(e)
