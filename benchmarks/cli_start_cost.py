"""Start-up cost of the command line: what every ``spatial-msma`` call pays before its work.

    python benchmarks/cli_start_cost.py [--repeats 7] \\
        [--out results/cli_start_cost.json] [--overwrite]

Times, in fresh processes and alternating, (a) building the CLI parser plus importing torch
(what ``detect`` and ``demo`` load before they start) and (b) the same plus scikit-learn
and pandas, which the ``gnsm`` package loaded eagerly at parser time before its names were
made lazy. Reports the median seconds of each, their difference, and which of the two
libraries (a) actually loads (none, if the lazy package works).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohort_args import refuse_existing_output  # noqa: E402

from SpatialMSMALib.errors import InputError  # noqa: E402

PARSER = "from SpatialMSMALib.cli import build_parser; build_parser(); import torch"
VARIANTS = {
    "parser_and_torch": PARSER,
    "plus_sklearn_and_pandas": PARSER + "; import sklearn.base, pandas",
}


def seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    try:
        refuse_existing_output(args)
    except InputError as e:
        parser.error(str(e))
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, code in VARIANTS.items():
            runs[name].append(seconds(code))
    loaded = subprocess.run(
        [sys.executable, "-c", PARSER + "; import sys; "
         "print(','.join(sorted({'sklearn', 'pandas'} & set(sys.modules))))"],
        check=True, capture_output=True, text=True).stdout.strip()
    medians = {name: float(np.median(values)) for name, values in runs.items()}
    result = {
        "median_s": medians, "runs_s": runs,
        "difference_s": medians["plus_sklearn_and_pandas"] - medians["parser_and_torch"],
        "loaded_by_parser": loaded.split(",") if loaded else [],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print("median s: " + ", ".join(f"{name} {value:.2f}" for name, value in medians.items())
          + f"; difference {result['difference_s']:.2f}; loaded by the parser: "
          + (loaded or "neither"))
    if args.out:
        from SpatialMSMALib.io import write_text_atomically

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
