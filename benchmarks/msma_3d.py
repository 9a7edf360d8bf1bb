"""Scan-level MSMA on the benchmark cohort: held-out healthy vs lesioned scans.

    python benchmarks/msma_3d.py --model runs/model.pt --manifest benchmark \\
        [--cache runs/score/cache] [--n-healthy 10] [--n-lesioned 20] [--out results.json] \\
        [--overwrite]

PROTOCOLS.md sec. 2 splits: ``test_healthy`` scans are inliers, ``test_lesioned`` scans
outliers; the model file (training/fit_msma.py) was fitted on ``train`` + ``val`` only.
Prints AUROC / AUPRC / FPR95 for every auxiliary model of the model file and, as
likelihood-free energy baselines, the single whole-brain score norm at the smallest and the
largest noise level, plus the fraction of test scans called "atypical" at the healthy 99th
percentile (the operating point of ``spatial-msma typicality``), and the verdicts for inputs
that are not what the model expects (swapped channels, inverted contrast, noise, intensity
drop).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohort_args import exit_with, refuse_existing_output  # noqa: E402

from SpatialMSMALib.dataset import ModelSpaceScan, manifest_scans, model_space  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.inference import (  # noqa: E402
    cached_features,
    compute_features,
    contrast_problems,
    select_device,
    typicality_report,
)
from SpatialMSMALib.io import write_text_atomically  # noqa: E402
from SpatialMSMALib.metrics import detection_metrics  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--n-healthy", type=int, default=10)
    parser.add_argument("--n-lesioned", type=int, default=20)
    parser.add_argument("--n-wrong", type=int, default=3,
                        help="healthy test scans used for the wrong-input checks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--save-local", action="store_true",
                        help="also cache the local feature maps (for the Spatial-MSMA stage)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    try:
        refuse_existing_output(args)
        model = AnomalyModel.load(args.model)
        if model.typicality is None:
            raise InputError(f"'{args.model}' carries no MSMA typicality model")
        splits = manifest_scans(args.manifest, ("test_healthy", "test_lesioned"))
    except InputError as e:
        exit_with(e)
    device = select_device(args.device)
    rows = splits["test_healthy"][: args.n_healthy] + splits["test_lesioned"][: args.n_lesioned]
    labels = np.r_[np.zeros(min(args.n_healthy, len(splits["test_healthy"]))),
                   np.ones(min(args.n_lesioned, len(splits["test_lesioned"])))]
    scans = model_space(rows, args.cache, model.spacing_mm, demons=model.demons,
                        brain_masks=model.brain_masks,
                        version=model.preprocess_version)
    feature_dir = args.cache / model.feature_cache_name()
    start = time.perf_counter()
    features, _ = cached_features(model, scans, feature_dir, device, save_local=args.save_local)
    print(f"features of {len(scans)} test scans in {time.perf_counter() - start:.0f} s")
    typ = model.typicality
    results = {"n_healthy": int((labels == 0).sum()), "n_lesioned": int((labels == 1).sum()),
               "score_training_step": model.provenance.get("score_training_step"),
               "n_fit_healthy": model.provenance.get("n_healthy"), "detectors": {}}
    for name in typ.models:
        scores = typ.score(features, name)
        metrics = detection_metrics(scores, labels)
        atypical = typ.percentile(scores, name) >= 99
        metrics["healthy_called_atypical"] = float(atypical[labels == 0].mean())
        metrics["lesioned_called_atypical"] = float(atypical[labels == 1].mean())
        results["detectors"][f"MSMA {name}"] = metrics
    sigmas = model.sigmas
    for i in (len(sigmas) - 1, 0):
        results["detectors"][f"single norm sigma={float(sigmas[i]):.3g}"] = detection_metrics(
            features[:, i], labels)
    print(f"\n{results['n_healthy']} healthy vs {results['n_lesioned']} lesioned test scans")
    print(f"{'detector':28s} {'AUROC':>7s} {'AUPRC':>7s} {'FPR95':>7s}  atypical@p99 h / l")
    for name, m in results["detectors"].items():
        extra = ""
        if "healthy_called_atypical" in m:
            extra = f"  {m['healthy_called_atypical']:.2f} / {m['lesioned_called_atypical']:.2f}"
        print(f"{name:28s} {m['auroc']:7.3f} {m['auprc']:7.3f} {m['fpr95']:7.3f}{extra}")
    results["wrong_inputs"] = wrong_input_verdicts(model, scans[: args.n_wrong], device)
    print("\nverdicts for model-space corruptions of healthy test scans (contrast check, then "
          "GMM):")
    for kind, verdicts in results["wrong_inputs"].items():
        print(f"  {kind:28s} {verdicts}")
    if args.out:
        write_text_atomically(args.out, json.dumps(results, indent=2))


def wrong_input_verdicts(model, healthy_scans, device) -> dict:
    """What the typicality verdict says for inputs that are not what the model expects:
    T1 and T2 swapped, contrast inverted, strong noise (SD 0.3 in normalised units) and a
    brain-wide intensity drop of half the range, all applied in model space to healthy scans."""
    rng = np.random.default_rng(0)
    variants = {
        "T1/T2 swapped": lambda im, m: im[::-1].copy(),
        "contrast inverted": lambda im, m: np.where(m, -im, im),
        "noise SD 0.3": lambda im, m: im + rng.normal(0, 0.3, im.shape) * m,
        "intensity drop 0.5": lambda im, m: im - 0.5 * m,
    }
    out = {}
    for kind, corrupt in variants.items():
        verdicts = []
        for scan in healthy_scans:
            image = corrupt(scan.image, scan.brain_mask[None]).astype(np.float32)
            _, whole = compute_features(model, ModelSpaceScan(scan.id, image, scan.brain_mask),
                                        device)
            problems = contrast_problems(model, image, scan.brain_mask)
            report = typicality_report(model, whole, float("nan"), problems, "gmm")
            verdicts.append(f"{report.verdict} (GMM p{report.scores['gmm']['percentile']:.0f})")
        out[kind] = verdicts
    return out


if __name__ == "__main__":
    main()
