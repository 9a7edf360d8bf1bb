"""Fit the MSMA typicality model on healthy scans and write the deployable model file.

    python training/fit_msma.py --score-checkpoint runs/score/best.pt --manifest benchmark \\
        --out runs/model.pt [--cache runs/score/cache] [--save-local]
    python training/fit_msma.py --model MODEL.pt --manifest benchmark --out runs/refit.pt

``--model``: refit only the typicality model of an existing model file on the same kind of
healthy scans; its score network, preprocessing, flow, calibrations and post-processing are
kept as they are (for instance after a change of ``score.features.FEATURE_VERSION``: the
stored healthy references are only valid for features computed the same way).

Healthy scans: the ``train`` and ``val`` splits of a manifest, or every scan of
``--data-dir``. For each scan (preprocessed once; the cache of train_score.py is reused) the
score network's whole-brain score norms (an L-vector) are computed and cached under
``CACHE/features_<checkpoint digest>/``; ``--save-local`` also keeps the (L, X, Y, Z) local
feature maps (float16) there for later stages. The auxiliary models (GMM, k-NN, flow) are
fitted on all healthy vectors; their healthy reference scores come from 5-fold cross-fitting,
so every percentile is computed against scans the model was not fitted on.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from SpatialMSMALib.dataset import (
    check_refused,
    folder_scans,
    healthy_ids_digest,
    manifest_scans,
    model_space,
    refusable_fraction,
    without_brain_mask,
)
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.inference import cached_features, select_device
from SpatialMSMALib.io import check_output_file
from SpatialMSMALib.model import AnomalyModel
from SpatialMSMALib.score.features import FEATURE_VERSION
from SpatialMSMALib.spatial import parse_levels
from SpatialMSMALib.typicality import MODEL_NAMES, TypicalityModel


def typicality_levels(spec: str, num_levels: int) -> list[int] | None:
    """``--levels`` -> level indices, or None for all of them."""
    text = spec.strip().lower()
    if text.startswith("every:"):
        try:
            step = int(text.split(":", 1)[1])
        except ValueError:
            step = 0
        if step < 1:
            raise InputError(f"--levels '{spec}': 'every:K' needs a whole number K >= 1")
        levels = list(range(0, num_levels, step))
    else:
        try:
            levels = parse_levels(text, num_levels)
        except ValueError as e:
            raise InputError(f"--levels: {e}") from None
    return None if levels == list(range(num_levels)) else levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    network = parser.add_mutually_exclusive_group(required=True)
    network.add_argument("--score-checkpoint", type=Path,
                         help="a train_score.py checkpoint: writes a new MSMA-only model file")
    network.add_argument("--model", type=Path,
                         help="a model file: refit only its typicality model, keep the rest")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path)
    source.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="model file to write")
    parser.add_argument("--cache", type=Path, help="preprocessing cache (default OUT.cache/)")
    parser.add_argument("--save-local", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--limit", type=int, help="use only the first N healthy scans")
    parser.add_argument("--levels", default="all",
                        help="noise levels the typicality model reads: 'all', 'a-b', 'i,j,k' "
                             "or 'every:K' (every K-th level from the first); detection then "
                             "evaluates only these when its flow reads no score norms")
    parser.add_argument("--max-refused-fraction", type=refusable_fraction, default=0.1,
                        help="stop when more than this fraction of the healthy scans is refused "
                             "by registration quality (default 0.1; as train_spatial.py: a "
                             "model without brain masks needs more); the ones left out are "
                             "listed either way")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        if args.out.exists() and not args.overwrite:
            raise InputError(f"'{args.out}' exists; use --overwrite to replace it")
        if args.manifest:
            splits = manifest_scans(args.manifest, ("train", "val"))
            rows = splits["train"] + splits["val"]
            cohort = {"manifest": str(args.manifest), "splits": ["train", "val"]}
        else:
            rows = folder_scans(args.data_dir)
            cohort = {"data_dir": str(args.data_dir)}
        rows = rows[: args.limit] if args.limit else rows
        if len(rows) < 8:
            raise InputError(f"{len(rows)} healthy scans: need at least 8 to fit and cross-fit")
        cache = args.cache or args.out.with_name(args.out.name + ".cache")
        if args.model:
            model = AnomalyModel.load(args.model)
            refit_of = {"name": args.model.name, "sha256": hashlib.sha256(
                args.model.read_bytes()).hexdigest(), "previous_n_healthy":
                model.provenance.get("n_healthy")}
        else:
            model = AnomalyModel.from_score_checkpoint(args.score_checkpoint)
        levels = typicality_levels(args.levels, len(model.sigmas))  # checked before the work
        refused: list = []
        scans = model_space(rows, cache, model.spacing_mm, demons=model.demons,
                            brain_masks=model.brain_masks,
                            version=model.preprocess_version,
                            channels=len(model.channel_names), refused=refused)
        check_refused(refused, len(rows), max_fraction=args.max_refused_fraction)
        refused_ids = {scan_id for scan_id, _ in refused}  # '<id>_atlasmask' for an atlas model
        rows = [r for r in rows
                if r.id not in refused_ids and without_brain_mask(r).id not in refused_ids]
        device = select_device(args.device)
        start = time.perf_counter()
        features, _ = cached_features(model, scans, cache / model.feature_cache_name(), device,
                                      save_local=args.save_local)
        print(f"features of {len(scans)} scans in {time.perf_counter() - start:.0f} s")
        model.typicality = TypicalityModel.fit(features, models=tuple(args.models),
                                               levels=levels)
        model.provenance.update({"typicality_cohort": cohort, "n_healthy": len(rows),
                                 "healthy_ids_sha256": healthy_ids_digest(r.id for r in rows),
                                 "typicality_feature_version": FEATURE_VERSION,
                                 "typicality_levels": levels})
        if args.model:
            model.provenance["typicality_refit_of"] = refit_of
        model.save(args.out, overwrite=args.overwrite)
        for name in model.typicality.models:
            ref = model.typicality.reference_scores[name]
            print(f"{name}: healthy out-of-fold scores median {np.median(ref):.3f}, "
                  f"95th percentile {np.percentile(ref, 95):.3f}")
        print(f"wrote {args.out}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
