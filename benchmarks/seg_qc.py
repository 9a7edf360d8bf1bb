"""Segmentation QC on the benchmark cohort's tissue label maps (PROTOCOLS.md sec. 5).

    python benchmarks/seg_qc.py --manifest benchmark/manifest.json --cache runs/cache \\
        [--model runs/seg_qc/seg_qc.pt] [--every 1] [--severities 0.25 0.5 1.0] \\
        [--out benchmarks/results/seg_qc.json]

Good maps: the tissue label maps (0 background, 1 CSF, 2 GM, 3 WM) of the ``train`` and
``val`` subjects in model space fit each QC method. Test maps: the clean maps of the test
splits (``test_healthy``, ``test_lesioned``, ``loao_*``) and, for each, every corruption kind
at every severity (seeded). Reports, per method: the Spearman correlation between the QC score
and the corrupted map's mean tissue Dice to its clean map (clean maps count with Dice 1; the
target is <= -0.8), and the AUROC for corrupted maps with Dice < 0.9 against the clean maps
(target >= 0.95); also per corruption kind. The JSON keeps every case (subject, kind,
severity, Dice) and every method's score per case, in the same order. Methods: the two baselines of
``SpatialMSMALib.segqc.baselines`` and, with ``--model``, GNSM on label maps
(:mod:`SpatialMSMALib.segqc.model`) with every read-out of one scoring pass (the model's
default is ``top_level_kl``). The GNSM model was trained on the ``train`` maps only and
calibrated on ``val``; ``--test-splits val`` runs the same table on corrupted validation maps
(how the default read-out was chosen, without touching the test maps).
``--every N`` keeps every N-th clean test map (all methods see the same cases).
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


def gnsm_results(model_path: Path, cases: list[dict], images: dict) -> dict:
    """The GNSM QC model's two read-outs on every case (one scoring pass)."""
    from tqdm import tqdm

    from SpatialMSMALib.segqc.model import SegQCModel

    model = SegQCModel.load(model_path)
    readouts, seconds = {}, []
    for case in tqdm(cases, desc="GNSM QC", mininterval=5):
        result = model.score_map(case["labels"], images[case["subject"]])
        for name, value in result.readouts.items():
            readouts.setdefault(name, []).append(value)
        seconds.append(result.seconds)
    cost = {"score_s_per_map": float(np.median(seconds)), "fit_s": None,
            "model": str(model_path)}
    return {f"GNSM ({name})": evaluate(np.array(values), cases) | cost | {"scores": values}
            for name, values in readouts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--severities", nargs="+", type=float, default=[0.25, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, help="GNSM QC model (training/train_seg_qc.py)")
    parser.add_argument("--every", type=int, default=1, help="keep every N-th clean test map")
    parser.add_argument("--test-splits", nargs="+", default=list(TEST_SPLITS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seg_qc.json"))
    args = parser.parse_args()
    splits = tuple(dict.fromkeys(("train", "val", *args.test_splits)))
    maps = cohort_label_maps(args.manifest, splits, args.cache, args.spacing, images=True)
    good = [m for split in ("train", "val") for _, m, _ in maps[split]]
    images = {i: image for split in splits for i, _, image in maps[split]}
    clean_test = [(i, m) for split in args.test_splits for i, m, _ in maps[split]]
    clean_test = clean_test[:: args.every]
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
                                                          "score_s_per_map": per_map_s,
                                                          "scores": scores.tolist()}
    if args.model:
        results.update(gnsm_results(args.model, cases, images))
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
        "test_splits": args.test_splits, "every": args.every,
        "n_good": len(good), "n_clean_test": len(clean_test), "n_cases": len(cases),
        "dice_by_kind_severity": {
            f"{kind}@{sev}": float(np.mean([c["dice"] for c in cases
                                            if c["kind"] == kind and c["severity"] == sev]))
            for kind in sorted(CORRUPTIONS) for sev in args.severities},
        "cases": [{"subject": c["subject"], "kind": c["kind"], "severity": c["severity"],
                   "dice": c["dice"]} for c in cases],
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
