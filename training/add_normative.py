"""Add the normative blob-contrast model to an existing model file, without retraining its flow.

    python training/add_normative.py --model Resources/Models/spatial_msma.pt \\
        --manifest train_cohort --work runs/add_normative --out runs/spatial_msma_nc.pt

What ``train_spatial.py --normative-contrast true`` does after the flow, for a flow that is
already trained: the model's preprocessing (affine, and its demons step) of the cohort's
healthy ``train`` / ``val`` scans, cached under ``WORK/cache`` (``train_spatial.py``'s cache
layout, so its work folder can be reused), the normative model fitted on the training scans,
and the calibration redone on the validation scans: each map's own, then the fused map's,
with the model's post-processing settings (default rate, smoothing, rim, peak rule; the
minimum component size chosen again by ``--min-component-ml``, as in training). The flow,
score network and typicality model are copied unchanged. Only for flows that do not read
score norms (the bundled intensity flows): score-norm flows need the features, so retrain
those with ``train_spatial.py --normative-contrast true``.

``--reuse-normative`` keeps a model's normative contrast model and redoes only the
calibrations on the validation scans, for instance with ``--scan-standardization`` (how the
bundled model's per-scan standardisation was added).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_score import cohort_record, scan_lists  # noqa: E402
from train_spatial import (  # noqa: E402
    add_normative_options,
    add_standardization_option,
    calibrate,
    normative_config,
    scan_standardization_rules,
)

from SpatialMSMALib.dataset import check_refused, model_space, refusable_fraction  # noqa: E402
from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import check_output_file  # noqa: E402
from SpatialMSMALib.model import AnomalyModel  # noqa: E402
from SpatialMSMALib.normative import NormativeContrast  # noqa: E402
from SpatialMSMALib.training_utils import training_device  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model file with a flow")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, nargs="+",
                        help="benchmark manifest(s) (file or folder); several are pooled")
    source.add_argument("--data-dir", type=Path, help="folder of healthy *_t1/_t2 NIfTI")
    parser.add_argument("--work", type=Path, required=True, help="preprocessing cache folder")
    parser.add_argument("--out", type=Path, required=True, help="model file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--min-component-ml", default="auto",
                        help="minimum component size (mL), or 'auto' (train_spatial.py's rule)")
    parser.add_argument("--healthy-budget-ml", type=float, default=1.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--reuse-normative", action="store_true",
                        help="keep the model's normative contrast model and redo only the "
                             "calibrations (for instance with --scan-standardization); only "
                             "the validation scans are read")
    parser.add_argument("--max-refused-fraction", type=refusable_fraction, default=0.1,
                        help="stop when more than this fraction of the cohort's scans is refused "
                             "by registration quality (default 0.1); the ones left out are "
                             "listed and recorded in the model file either way")
    add_standardization_option(parser)
    add_normative_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        if args.out.exists() and not args.overwrite:
            raise InputError(f"'{args.out}' exists; pass --overwrite to replace it")
        normative_config(args)  # a bad setting fails before any work
        scan_standardization_rules(args.scan_standardization, True)
        model = AnomalyModel.load(args.model)
        if model.spatial is None or model.calibration is None:
            raise InputError(f"{args.model}: has no Spatial-MSMA flow to add to")
        if model.spatial.config.score_features:
            raise InputError(f"{args.model}: its flow reads score norms; retrain it with "
                             "training/train_spatial.py --normative-contrast true")
        if model.normative is not None and not args.reuse_normative:
            raise InputError(f"{args.model}: already has a normative contrast model (pass "
                             "--reuse-normative to recalibrate it)")
        if model.normative is None and args.reuse_normative:
            raise InputError(f"{args.model}: has no normative contrast model to reuse")
        device = training_device(args.device)
        start = time.perf_counter()
        splits = scan_lists(args)
        refused: list = []
        needed = ("val",) if args.reuse_normative else ("train", "val")
        scans = {name: model_space(splits[name], args.work / "cache", model.spacing_mm,
                                   demons=model.demons,
                                   brain_masks=model.brain_masks, channels=len(model.channel_names),
                                   refused=refused)
                 for name in needed}
        check_refused(refused, sum(len(splits[name]) for name in needed),
                      max_fraction=args.max_refused_fraction)
        if any(not scans[name] for name in needed):
            raise InputError("no training or no validation scan left after registration")
        preprocess_seconds = time.perf_counter() - start
        t0 = time.perf_counter()
        if not args.reuse_normative:
            model.normative = NormativeContrast.fit(
                ((s.image, s.brain_mask) for s in scans["train"]),
                normative_config(args, model.spacing_mm))
        old = model.calibration
        settings = argparse.Namespace(
            fpr=old.default_fpr, smoothing_mm=old.smoothing_mm, rim_mm=old.rim_mm,
            max_peak_fpr=old.max_peak_fpr, grow_rate_factor=old.grow_rate_factor,
            min_component_ml=args.min_component_ml,
            healthy_budget_ml=args.healthy_budget_ml,
            scan_standardization=args.scan_standardization)
        no_norms = np.zeros((0, *model.shape), np.float32)  # the flow reads intensities only
        model.calibration = calibrate(model, scans["val"], lambda i: no_norms, device, settings)
        seconds = {"preprocessing": round(preprocess_seconds, 1),
                   "fit_and_calibration": round(time.perf_counter() - t0, 1)}
        if args.reuse_normative:
            model.provenance.setdefault("normative_contrast", {})["recalibrated"] = {
                "from": {"name": args.model.name},
                "cohort": cohort_record(args.manifest) if args.manifest else str(args.data_dir),
                "n_val": len(scans["val"]), "scan_standardization": args.scan_standardization,
                "refused_scans": [{"id": i, "reason": r} for i, r in refused],
                "seconds": seconds}
        else:
            model.provenance["normative_contrast"] = {
                "added_to": {"name": args.model.name},
                "cohort": cohort_record(args.manifest) if args.manifest else str(args.data_dir),
                "n_train": len(scans["train"]), "n_val": len(scans["val"]),
                "train_ids": [s.id for s in scans["train"]],
                "scan_standardization": args.scan_standardization,
                "refused_scans": [{"id": i, "reason": r} for i, r in refused],
                "seconds": seconds}
        model.save(args.out, overwrite=args.overwrite)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fitted = "reused" if args.reuse_normative else f"on {len(scans['train'])} scans"
    print(f"normative contrast model {fitted}, calibrated on "
          f"{len(scans['val'])}; default threshold {model.calibration.default_threshold:.3f}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
