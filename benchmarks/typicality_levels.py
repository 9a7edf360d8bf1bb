"""MSMA typicality on every noise level against a subset of them, on held-out cohorts.

    python benchmarks/typicality_levels.py --model MODEL --fit-manifest train_cohort \\
        --fit-cache W/cache --eval dev=dev/manifest.json=DEV_CACHE [--eval ...] \\
        [--levels every:2] [--lesioned 12] [--max-refused-fraction F] \\
        [--out results/typicality_levels.json]

Fits the model's kind of typicality model (GMM, k-NN; healthy references by 5-fold
cross-fitting, as ``training/fit_msma.py``) on the whole-brain score norms of the fit
cohort's healthy ``train`` + ``val`` scans twice: on all L levels and on ``--levels``. Every
``--eval`` cohort (``name=manifest=cache``) is then scored by both: its ``test_healthy`` scans
(the training distribution), its ``loao_healthy`` scans (a held-out anatomy: a shift the
verdict should see) and its first ``--lesioned`` ``test_lesioned`` scans. Per variant and
cohort: how many scans of each group are called atypical (percentile >= 99) and borderline
or worse (>= 95), and the AUROC of healthy against lesioned test scans. Features are read
from or written to each cache's feature folder (``inference.cached_features``). Scans the
registration gate refuses are left out and named; more than ``--max-refused-fraction`` of a
group (default 0.1; a model without brain masks refuses more) stops the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from cohort_args import BUNDLED_MODEL, exit_with, refuse_existing_output  # noqa: E402
from fit_msma import typicality_levels  # noqa: E402

from SpatialMSMALib.dataset import (  # noqa: E402
    check_refused,
    manifest_scans,
    model_space,
    refusable_fraction,
)
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.inference import cached_features  # noqa: E402
from SpatialMSMALib.io import write_text_atomically  # noqa: E402
from SpatialMSMALib.metrics import detection_metrics  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402
from SpatialMSMALib.typicality import VERDICT_PERCENTILES, TypicalityModel  # noqa: E402

AUX_MODELS = ("gmm", "knn")
GROUPS = ("test_healthy", "loao_healthy", "test_lesioned")


def features_of(model: AnomalyModel, rows, cache: Path,
                max_refused_fraction: float = 0.1) -> np.ndarray:
    """``(N, L)`` whole-brain norms of ``rows`` (scans whose registration is refused are
    left out and named; more than ``max_refused_fraction`` of them stops the run)."""
    refused: list = []
    scans = model_space(rows, cache, model.spacing_mm, demons=model.demons,
                        brain_masks=model.brain_masks,
                        version=model.preprocess_version, channels=len(model.channel_names),
                        refused=refused)
    check_refused(refused, len(rows), max_fraction=max_refused_fraction)
    features, _ = cached_features(model, scans, cache / model.feature_cache_name(), "cpu")
    return features


def group_figures(typ: TypicalityModel, features: dict[str, np.ndarray]) -> dict:
    """Per auxiliary model: atypical / borderline-or-worse counts per group the cohort has
    (a group without scans is left out), and the AUROC of test_healthy against
    test_lesioned when it has both."""
    out = {}
    for name in typ.models:
        figures = {}
        scores = {group: typ.score(values, name) for group, values in features.items()}
        for group, values in scores.items():
            percentile = typ.percentile(values, name)
            figures[group] = {
                "n": len(values),
                "atypical": int((percentile >= VERDICT_PERCENTILES["atypical"]).sum()),
                "borderline_or_worse": int(
                    (percentile >= VERDICT_PERCENTILES["borderline"]).sum())}
        if "test_healthy" in scores and "test_lesioned" in scores:
            labels = np.r_[np.zeros(len(scores["test_healthy"])),
                           np.ones(len(scores["test_lesioned"]))]
            figures["auroc_healthy_vs_lesioned"] = detection_metrics(
                np.r_[scores["test_healthy"], scores["test_lesioned"]], labels)["auroc"]
        out[name] = figures
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--fit-manifest", type=Path, required=True)
    parser.add_argument("--fit-cache", type=Path, required=True)
    parser.add_argument("--eval", action="append", required=True,
                        help="name=manifest=cache of a cohort to score (repeatable)")
    parser.add_argument("--levels", default="every:2")
    parser.add_argument("--lesioned", type=int, default=12)
    parser.add_argument("--max-refused-fraction", type=refusable_fraction, default=0.1,
                        help="per group of scans: stop when more than this fraction is refused "
                             "by registration quality (default 0.1; a model without brain "
                             "masks needs more)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        refuse_existing_output(args)
        cohorts = []
        for spec in args.eval:
            parts = spec.split("=")
            if len(parts) != 3:
                raise InputError(f"--eval '{spec}': expected name=manifest=cache")
            cohorts.append((parts[0], Path(parts[1]), Path(parts[2])))
        model = AnomalyModel.load(args.model)
        levels = typicality_levels(args.levels, len(model.sigmas))
        if levels is None:
            raise InputError(f"--levels '{args.levels}' selects every level: nothing to compare")
        fit_splits = manifest_scans(args.fit_manifest, ("train", "val"))
        eval_rows = {}
        for name, manifest, _ in cohorts:
            splits = manifest_scans(manifest, GROUPS)
            eval_rows[name] = {"test_healthy": splits["test_healthy"],
                               "loao_healthy": splits["loao_healthy"],
                               "test_lesioned": splits["test_lesioned"][: args.lesioned]}
            if not any(eval_rows[name].values()):
                raise InputError(f"--eval '{name}': {manifest} has no test_healthy, "
                                 "loao_healthy or test_lesioned scans")
        healthy = features_of(model, fit_splits["train"] + fit_splits["val"], args.fit_cache,
                              args.max_refused_fraction)
    except InputError as e:
        exit_with(e)
    variants = {"all": TypicalityModel.fit(healthy, models=AUX_MODELS),
                args.levels: TypicalityModel.fit(healthy, models=AUX_MODELS, levels=levels)}
    result = {"command": " ".join(sys.argv), "model": Path(args.model).name,
              "machine": {"cpu_threads": torch.get_num_threads(),
                          "platform": platform.platform()},
              "n_fit_healthy": len(healthy), "levels": {"all": "all", args.levels: levels},
              "cohorts": {}}
    for name, _, cache in cohorts:
        try:
            features = {group: features_of(model, rows, cache, args.max_refused_fraction)
                        for group, rows in eval_rows[name].items() if rows}
        except InputError as e:
            exit_with(e)
        result["cohorts"][name] = {variant: group_figures(typ, features)
                                   for variant, typ in variants.items()}
        print(name, json.dumps(result["cohorts"][name]), flush=True)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
