"""Cost of `spatial-msma detect` end to end on one 1 mm T1 + T2 pair (or T1 alone).

    python benchmarks/detect_cost.py [--model MODEL] [--baseline MODEL] [--t1-only] \\
        [--repeats 3] [--out results/detect_cost.json]

Builds the demo's sample subject (MNI152 2009a, 1 mm, simulated lesions) once, then runs
the real command line ``spatial-msma detect`` in a fresh process ``--repeats`` times (load,
preprocess, features, flow, post-process, write) and reports the median wall time, the
per-stage seconds from the report, and the peak resident memory of the detect processes.

With ``--baseline`` the baseline model's runs alternate with the model's (baseline first in
each round), so both see the same machine; the result then holds the baseline's figures
and the ratio of the medians. This machine's speed drifts by up to 2x within an hour, so
only such same-run ratios compare two models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--baseline", type=Path,
                        help="a model to time in alternation with --model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--t1-only", action="store_true",
                        help="give detect the T1 alone (for a T1-only model)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    for model in (args.model, args.baseline):
        if model is not None and not model.is_file():
            parser.error(f"model file '{model}' does not exist")
    from SpatialMSMALib.demo import make_sample

    work = Path(tempfile.mkdtemp(prefix="detect_cost_"))
    sample = make_sample(work / "input", seed=7, spacing=1.0)
    command = [sys.executable, "-m", "SpatialMSMALib.cli", "detect",
               "--t1", str(sample["paths"]["t1"]),
               *([] if args.t1_only else ["--t2", str(sample["paths"]["t2"])]),
               "--mask", str(sample["paths"]["brain_mask"]),
               "--device", args.device, "--overwrite"]

    def detect_once(model: Path | None, out: Path) -> tuple[float, dict, float]:
        """Wall seconds, the report's stage seconds and the process's peak RSS in GB."""
        start = time.perf_counter()
        process = subprocess.Popen(
            command + ([] if model is None else ["--model", str(model)]) + ["--out", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=os.environ | {"TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"detect failed (model {model}); rerun it by hand to see why")
        return wall, json.loads((out / "report.json").read_text())["timings_s"], \
            usage.ru_maxrss / 1024**2

    runs: dict[str, list] = {"model": [], "baseline": []}
    for i in range(args.repeats):
        for role, model in (("baseline", args.baseline), ("model", args.model)):
            if role == "baseline" and args.baseline is None:
                continue
            wall, stage, peak = detect_once(model, work / f"{role}{i}")
            runs[role].append((wall, stage, peak))
            print(f"round {i + 1} {role}: {wall:.1f} s  {stage}", flush=True)

    def summary(role_runs: list) -> dict:
        walls = [wall for wall, _, _ in role_runs]
        stages = [stage for _, stage, _ in role_runs]
        return {
            "median_wall_s": float(np.median(walls)), "wall_s": walls,
            "median_stage_s": {k: float(np.median([s[k] for s in stages])) for k in stages[0]},
            "peak_rss_gb": round(max(peak for _, _, peak in role_runs), 2),
        }

    result = {
        "input": "1 mm MNI152 2009a sample, {}, {}".format(
            "T1" if args.t1_only else "T1 + T2",
            "x".join(str(s) for s in sample["lesion_mask"].shape)),
        **summary(runs["model"]),
        "machine": {"cpus": os.cpu_count(), "device": args.device,
                    "platform": platform.platform()},
    }
    if args.baseline is not None:
        result["model"] = args.model.name if args.model else "bundled default"
        result["baseline"] = {"model": args.baseline.name, **summary(runs["baseline"])}
        result["ratio_to_baseline"] = round(
            result["median_wall_s"] / result["baseline"]["median_wall_s"], 3)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
