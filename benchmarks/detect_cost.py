"""Cost of `spatial-msma detect` end to end on one 1 mm T1 + T2 pair (or T1 alone).

    python benchmarks/detect_cost.py [--model MODEL] [--t1-only] [--repeats 3] \\
        [--out results/detect_cost.json]

Builds the demo's sample subject (MNI152 2009a, 1 mm, simulated lesions) once, then runs
the real command line ``spatial-msma detect`` in a fresh process ``--repeats`` times (load,
preprocess, features, flow, post-process, write) and reports the median wall time, the
per-stage seconds from the report, and the peak resident memory of the detect processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--t1-only", action="store_true",
                        help="give detect the T1 alone (for a T1-only model)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from SpatialMSMALib.demo import make_sample

    work = Path(tempfile.mkdtemp(prefix="detect_cost_"))
    sample = make_sample(work / "input", seed=7, spacing=1.0)
    command = [sys.executable, "-m", "SpatialMSMALib.cli", "detect",
               "--t1", str(sample["paths"]["t1"]),
               *([] if args.t1_only else ["--t2", str(sample["paths"]["t2"])]),
               "--mask", str(sample["paths"]["brain_mask"]),
               "--device", args.device, "--overwrite"]
    if args.model:
        command += ["--model", str(args.model)]
    walls, stages = [], []
    for i in range(args.repeats):
        out = work / f"run{i}"
        start = time.perf_counter()
        subprocess.run(command + ["--out", str(out)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=os.environ | {"TQDM_DISABLE": "1"})
        walls.append(time.perf_counter() - start)
        stages.append(json.loads((out / "report.json").read_text())["timings_s"])
        print(f"run {i + 1}: {walls[-1]:.1f} s  {stages[-1]}", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    result = {
        "input": "1 mm MNI152 2009a sample, {}, {}".format(
            "T1" if args.t1_only else "T1 + T2",
            "x".join(str(s) for s in sample["lesion_mask"].shape)),
        "median_wall_s": float(np.median(walls)), "wall_s": walls,
        "median_stage_s": {k: float(np.median([s[k] for s in stages])) for k in stages[0]},
        "peak_rss_gb": round(peak_gb, 2),
        "machine": {"cpus": os.cpu_count(), "device": args.device,
                    "platform": platform.platform()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
