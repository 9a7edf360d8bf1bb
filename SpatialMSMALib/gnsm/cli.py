"""``spatial-msma gnsm fit`` / ``spatial-msma gnsm score``: GNSM on CSV / ARFF tables."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import check_output_file


def add_gnsm(sub) -> None:
    gnsm = sub.add_parser("gnsm", help="GNSM anomaly detection on categorical / mixed tables")
    commands = gnsm.add_subparsers(dest="gnsm_command", required=True)

    p = commands.add_parser("fit", help="fit a GNSM detector on a table (CSV or ARFF)")
    p.add_argument("table", type=Path)
    p.add_argument("--out", type=Path, required=True, help="model file to write")
    p.add_argument("--label-column", help="column with labels: dropped from the features; "
                   "with --anomaly-value, rows with that value are left out of the fit")
    p.add_argument("--anomaly-value", help="label value that marks anomalies")
    p.add_argument("--categorical", nargs="+", default=None, metavar="COLUMN",
                   help="force these columns to be categorical")
    p.add_argument("--numeric", nargs="+", default=None, metavar="COLUMN",
                   help="force these columns to be numeric")
    p.add_argument("--constant-columns", choices=["error", "keep", "drop"], default="error",
                   help="single-valued training columns (default: error)")
    p.add_argument("--method", choices=["denoising", "norms"], default="denoising")
    p.add_argument("--steps", type=int, default=1000, help="score-matching steps")
    p.add_argument("--contamination", type=float, default=0.1,
                   help="expected outlier fraction of the training rows (sets the threshold)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_fit)

    p = commands.add_parser("score", help="score a table with a fitted GNSM model")
    p.add_argument("model", type=Path)
    p.add_argument("table", type=Path)
    p.add_argument("--out", type=Path, required=True, help="CSV of per-row scores to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_score)


def _run_fit(args: argparse.Namespace) -> int:
    from .detector import GNSM
    from .suite import split_labels
    from .table import read_table

    check_output_file(args.out)
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"'{args.out}' already exists; pass --overwrite to replace it")
    frame = read_table(args.table)
    labels = None
    if args.label_column:
        if args.anomaly_value is not None:
            frame, labels = split_labels(frame, args.label_column, args.anomaly_value,
                                         str(args.table))
            frame = frame[labels == 0].reset_index(drop=True)
        elif args.label_column in frame.columns:
            frame = frame.drop(columns=[args.label_column])
        else:
            raise InputError(f"{args.table}: no label column '{args.label_column}'")
    elif args.anomaly_value is not None:
        raise InputError("--anomaly-value needs --label-column")
    detector = GNSM(contamination=args.contamination, method=args.method, steps=args.steps,
                    categorical_columns=args.categorical, numeric_columns=args.numeric,
                    constant_columns=args.constant_columns, device=args.device,
                    random_state=args.seed, verbose=True)
    start = time.perf_counter()
    try:
        detector.fit(frame)
    except InputError as e:
        raise InputError(f"{args.table}: {e}") from e
    metadata = {"label_column": args.label_column, "anomaly_value": args.anomaly_value,
                "source": str(args.table), "rows": len(frame)}
    detector.save(args.out, overwrite=args.overwrite, metadata=metadata)
    left_out = "" if labels is None else f" ({int(labels.sum())} anomalous rows left out)"
    enc = detector.encoder_
    print(f"fitted on {len(frame)} rows{left_out}: {len(enc.categorical)} categorical, "
          f"{len(enc.numeric)} numeric columns"
          + (f", dropped constant {enc.dropped}" if enc.dropped else "")
          + f"; {time.perf_counter() - start:.1f} s")
    print(f"threshold {detector.threshold_:.4f} (contamination {args.contamination}); "
          f"model written to {args.out}")
    return 0


def _run_score(args: argparse.Namespace) -> int:
    import pandas as pd

    from .detector import GNSM
    from .suite import split_labels
    from .table import read_table

    check_output_file(args.out)
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"'{args.out}' already exists; pass --overwrite to replace it")
    detector = GNSM.load(args.model)
    frame = read_table(args.table)
    meta = detector.metadata_
    labels = None
    label_column = meta.get("label_column")
    if label_column and label_column in frame.columns:
        if meta.get("anomaly_value") is not None:
            frame, labels = split_labels(frame, label_column, meta["anomaly_value"],
                                         str(args.table))
        else:
            frame = frame.drop(columns=[label_column])
    start = time.perf_counter()
    try:
        scores = detector.decision_function(frame)
    except InputError as e:
        raise InputError(f"{args.table}: {e}") from e
    seconds = time.perf_counter() - start
    outlier = (scores > detector.threshold_).astype(int)
    probability = detector.outlier_probability(scores)
    table = pd.DataFrame({"row": np.arange(len(scores)), "score": scores, "outlier": outlier,
                          "outlier_probability": probability})
    if labels is not None:
        table["label"] = labels
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.partial")
    table.to_csv(tmp, index=False)
    tmp.replace(args.out)
    print(f"scored {len(scores)} rows in {seconds:.2f} s ({len(scores) / seconds:.0f} rows/s); "
          f"{int(outlier.sum())} above the threshold {detector.threshold_:.4f}")
    if labels is not None and 0 < labels.sum() < len(labels):
        from sklearn.metrics import average_precision_score, roc_auc_score

        print(f"against '{label_column}' = '{meta['anomaly_value']}' "
              f"({int(labels.sum())} anomalies): AUROC {roc_auc_score(labels, scores):.4f}, "
              f"AUPRC {average_precision_score(labels, scores):.4f}")
    print(f"scores written to {args.out}")
    return 0
