"""Segmentation QC on the benchmark cohort's tissue label maps (PROTOCOLS.md sec. 5).

    python benchmarks/seg_qc.py --manifest benchmark/manifest.json --cache runs/cache \\
        [--severities 0.25 0.5 1.0] [--out benchmarks/results/seg_qc.json]

Good maps: the tissue label maps (0 background, 1 CSF, 2 GM, 3 WM) of the ``train`` and
``val`` subjects in model space fit each QC method. Test maps: the clean maps of the test
splits (``test_healthy``, ``test_lesioned``, ``loao_*``) and, for each, every corruption kind
at every severity (seeded). Reports, per method: the Spearman correlation between the QC score
and the corrupted map's mean tissue Dice to its clean map (clean maps count with Dice 1; the
target is <= -0.8), and the AUROC for corrupted maps with Dice < 0.9 against the clean maps
(target >= 0.95); also per corruption kind. Methods today: the two baselines of
``SpatialMSMALib.segqc.baselines`` (GNSM on label maps is still to come).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from SpatialMSMALib.segqc.baselines import AtlasDice, VolumeZScore
from SpatialMSMALib.segqc.corruptions import CORRUPTIONS, corrupt, mean_dice
from SpatialMSMALib.segqc.data import cohort_label_maps

TEST_SPLITS = ("test_healthy", "test_lesioned", "loao_healthy", "loao_lesioned")


def build_test_set(clean_maps, severities, seed: int) -> list[dict]:
    """Clean maps plus every corruption x severity of each; ``dice`` to the clean map."""
    cases = []
    for index, (subject, labels) in enumerate(clean_maps):
        cases.append({"subject": subject, "kind": "clean", "severity": 0.0, "dice": 1.0,
                      "labels": labels})
        for k, kind in enumerate(sorted(CORRUPTIONS)):
            for s, severity in enumerate(severities):
                rng = np.random.default_rng([seed, index, k, s])
                damaged = corrupt(labels, kind, severity, rng)
                cases.append({"subject": subject, "kind": kind, "severity": severity,
                              "dice": mean_dice(labels, damaged), "labels": damaged})
    return cases


def evaluate(scores: np.ndarray, cases: list[dict]) -> dict:
    dice = np.array([c["dice"] for c in cases])
    kinds = np.array([c["kind"] for c in cases])
    clean = kinds == "clean"
    bad = ~clean & (dice < 0.9)
    out = {"spearman": float(spearmanr(scores, dice)[0]),
           "auroc_dice_below_0.9": float(roc_auc_score(
               np.r_[np.zeros(clean.sum()), np.ones(bad.sum())],
               np.r_[scores[clean], scores[bad]])),
           "n_clean": int(clean.sum()), "n_dice_below_0.9": int(bad.sum()), "by_kind": {}}
    for kind in sorted(CORRUPTIONS):
        pick = clean | (kinds == kind)
        entry = {"spearman": float(spearmanr(scores[pick], dice[pick])[0])}
        bad_kind = (kinds == kind) & (dice < 0.9)
        if bad_kind.any():
            entry["auroc_dice_below_0.9"] = float(roc_auc_score(
                np.r_[np.zeros(clean.sum()), np.ones(bad_kind.sum())],
                np.r_[scores[clean], scores[bad_kind]]))
        out["by_kind"][kind] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--severities", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seg_qc.json"))
    args = parser.parse_args()
    maps = cohort_label_maps(args.manifest, ("train", "val", *TEST_SPLITS), args.cache,
                             args.spacing)
    good = [m for split in ("train", "val") for _, m in maps[split]]
    clean_test = [entry for split in TEST_SPLITS for entry in maps[split]]
    cases = build_test_set(clean_test, args.severities, args.seed)
    print(f"{len(good)} good maps for fitting; {len(clean_test)} clean test maps, "
          f"{len(cases) - len(clean_test)} corrupted "
          f"(Dice range {min(c['dice'] for c in cases):.3f}-1)")
    results = {}
    for method in (VolumeZScore(), AtlasDice()):
        start = time.perf_counter()
        method.fit(good)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = np.array([method.score(c["labels"]) for c in cases])
        per_map_s = (time.perf_counter() - start) / len(cases)
        results[method.name] = evaluate(scores, cases) | {"fit_s": fit_s,
                                                          "score_s_per_map": per_map_s}
    print("\n| method | Spearman(score, Dice) | AUROC Dice<0.9 vs clean | s per map |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['spearman']:.3f} | {r['auroc_dice_below_0.9']:.3f} | "
              f"{r['score_s_per_map']:.3f} |")
    print("\nper corruption kind (Spearman / AUROC):")
    for kind in sorted(CORRUPTIONS):
        cells = [f"{r['by_kind'][kind]['spearman']:.2f} / "
                 f"{r['by_kind'][kind].get('auroc_dice_below_0.9', float('nan')):.2f}"
                 for r in results.values()]
        print(f"  {kind:8s} " + "   ".join(f"{n}: {c}" for n, c in zip(results, cells,
                                                                          strict=True)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "manifest": str(args.manifest), "severities": args.severities, "seed": args.seed,
        "n_good": len(good), "n_clean_test": len(clean_test), "n_cases": len(cases),
        "dice_by_kind_severity": {
            f"{kind}@{sev}": float(np.mean([c["dice"] for c in cases
                                            if c["kind"] == kind and c["severity"] == sev]))
            for kind in sorted(CORRUPTIONS) for sev in args.severities},
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
