"""GNSM scoring throughput on bank (rows per second), against PyOD baselines in the same run.

    python benchmarks/gnsm_throughput.py ../shared/data/tabular [--repeats 5]
        [--out benchmarks/results/gnsm_throughput.json]

Fits on the seed-0 training inliers (PROTOCOLS.md sec. 3 split), then times
``decision_function`` on all 41,188 rows of bank (table in, scores out: encoding included),
median of ``--repeats`` runs, for the default GNSM, a smaller GNSM (width 96, 2 blocks) and
IForest / ECOD on one-hot inputs (one-hot encoding included in their time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from SpatialMSMALib.gnsm import GNSM, TabularEncoder
from SpatialMSMALib.gnsm.suite import load_dataset


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/gnsm_throughput.json"))
    args = parser.parse_args()
    features, labels = load_dataset(args.data, "bank")
    train_idx, _ = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=labels,
                                    random_state=0)
    train = features.iloc[train_idx[labels[train_idx] == 0]].reset_index(drop=True)
    results = {}
    configs = {"GNSM (default: width 128, 3 blocks)": {},
               "GNSM (width 96, 2 blocks)": {"width": 96, "blocks": 2}}
    for name, options in configs.items():
        detector = GNSM(random_state=0, constant_columns="keep", **options).fit(train)
        seconds = median_seconds(lambda d=detector: d.decision_function(features), args.repeats)
        results[name] = {"seconds": seconds, "rows_per_s": len(features) / seconds,
                         "fit_s": detector.fit_seconds_}
    encoder = TabularEncoder.fit(train, constant_columns="keep")
    from pyod.models.ecod import ECOD
    from pyod.models.iforest import IForest

    for name, detector in {"IForest": IForest(random_state=0, n_jobs=2), "ECOD": ECOD()}.items():
        detector.fit(encoder.one_hot(train))
        seconds = median_seconds(
            lambda d=detector: d.decision_function(encoder.one_hot(features)), args.repeats)
        results[name] = {"seconds": seconds, "rows_per_s": len(features) / seconds}
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads()}
    base = results["GNSM (default: width 128, 3 blocks)"]["rows_per_s"]
    for name, r in results.items():
        r["relative_to_default_gnsm"] = r["rows_per_s"] / base
        print(f"{name:36s} {r['rows_per_s']:9.0f} rows/s  ({r['seconds']:.2f} s for "
              f"{len(features)} rows; {r['relative_to_default_gnsm']:.2f}x default GNSM)")
    print(f"machine: {machine}, median of {args.repeats} runs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": len(features), "machine": machine,
                                    "repeats": args.repeats, "results": results}, indent=1))


if __name__ == "__main__":
    main()
