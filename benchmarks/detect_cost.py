"""Cost of `spatial-msma detect` end to end on one 1 mm T1 + T2 pair (or T1 alone).

    python benchmarks/detect_cost.py [--model MODEL] [--baseline MODEL] [--t1-only] \\
        [--without-mask] \\
        [--baseline-code DIR] [--repeats 3] [--out results/detect_cost.json] [--overwrite]

Builds the demo's sample subject (MNI152 2009a, 1 mm, simulated lesions) once, then runs
the real command line ``spatial-msma detect`` in a fresh process ``--repeats`` times (load,
preprocess, features, flow, post-process, write) and reports the median wall time, the
per-stage seconds from the report, and the peak resident memory of the detect processes.

With ``--baseline`` the baseline model's runs alternate with the model's (baseline first in
each round), so both see the same machine; the result then holds the baseline's figures
and the ratio of the medians. This machine's speed drifts by up to 2x within an hour, so
only such same-run ratios compare two models.

``--baseline-code DIR`` does the same for two versions of the code: the baseline runs import
SpatialMSMALib from DIR, another checkout of this repository (``git worktree add /tmp/base
COMMIT``), with the baseline model (the same model when ``--baseline`` is not given). The
result records the commit of each side and where each side's package was imported from.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cohort_args import refuse_existing_output  # noqa: E402

from SpatialMSMALib.errors import InputError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--baseline", type=Path,
                        help="a model to time in alternation with --model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--baseline-code", type=Path,
                        help="another checkout of this repository: the baseline runs use its "
                             "code (and --baseline's model, else --model's)")
    parser.add_argument("--t1-only", action="store_true",
                        help="give detect the T1 alone (for a T1-only model)")
    parser.add_argument("--without-mask", action="store_true",
                        help="run detect without --mask (the atlas brain mask path, and the "
                             "bundled model for scans without a mask)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    try:
        refuse_existing_output(args)
    except InputError as e:
        parser.error(str(e))
    for model in (args.model, args.baseline):
        if model is not None and not model.is_file():
            parser.error(f"model file '{model}' does not exist")
    code = {"model": _code_side(None)}
    if args.baseline_code is not None:
        if not (args.baseline_code / "SpatialMSMALib" / "__init__.py").is_file():
            parser.error(f"--baseline-code '{args.baseline_code}' is not a checkout of this "
                         "repository (no SpatialMSMALib/__init__.py in it)")
        args.baseline_code = args.baseline_code.resolve()
        code["baseline"] = _code_side(args.baseline_code)
        if code["baseline"]["imported_from"] == code["model"]["imported_from"]:
            parser.error("--baseline-code imports the same SpatialMSMALib as the model runs")
    from SpatialMSMALib.demo import make_sample

    work = Path(tempfile.mkdtemp(prefix="detect_cost_"))
    sample = make_sample(work / "input", seed=7, spacing=1.0)
    command = [sys.executable, "-m", "SpatialMSMALib.cli", "detect",
               "--t1", str(sample["paths"]["t1"]),
               *([] if args.t1_only else ["--t2", str(sample["paths"]["t2"])]),
               *([] if args.without_mask else ["--mask", str(sample["paths"]["brain_mask"])]),
               "--device", args.device, "--overwrite"]

    def detect_once(model: Path | None, out: Path, code_dir: Path | None = None
                    ) -> tuple[float, dict, float]:
        """Wall seconds, the report's stage seconds and the process's peak RSS in GB."""
        start = time.perf_counter()
        process = subprocess.Popen(
            command + ([] if model is None else ["--model", str(model.resolve())])
            + ["--out", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            **_code_environment(code_dir, {"TQDM_DISABLE": "1"}))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"detect failed (model {model}); rerun it by hand to see why")
        return wall, json.loads((out / "report.json").read_text())["timings_s"], \
            usage.ru_maxrss / 1024**2

    runs: dict[str, list] = {"model": [], "baseline": []}
    has_baseline = args.baseline is not None or args.baseline_code is not None
    baseline_model = args.baseline if args.baseline is not None else args.model
    for i in range(args.repeats):
        for role, model in (("baseline", baseline_model), ("model", args.model)):
            if role == "baseline" and not has_baseline:
                continue
            wall, stage, peak = detect_once(
                model, work / f"{role}{i}", args.baseline_code if role == "baseline" else None)
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
        "input": "1 mm MNI152 2009a sample, {}{}, {}".format(
            "T1" if args.t1_only else "T1 + T2",
            ", no brain mask" if args.without_mask else "",
            "x".join(str(s) for s in sample["lesion_mask"].shape)),
        **summary(runs["model"]),
        "code": code["model"],
        "machine": {"cpus": os.cpu_count(), "device": args.device,
                    "platform": platform.platform()},
    }
    if has_baseline:
        result["model"] = args.model.name if args.model else "bundled default"
        result["baseline"] = {
            "model": baseline_model.name if baseline_model else "bundled default",
            **({"code": code["baseline"]} if "baseline" in code else {}),
            **summary(runs["baseline"])}
        result["ratio_to_baseline"] = round(
            result["median_wall_s"] / result["baseline"]["median_wall_s"], 3)
    print(json.dumps(result, indent=1))
    if args.out:
        from SpatialMSMALib.io import write_text_atomically

        write_text_atomically(args.out, json.dumps(result, indent=1))


def _code_environment(code_dir: Path | None, extra: dict) -> dict:
    """``Popen`` keyword arguments that make ``python -m SpatialMSMALib...`` import the
    package from ``code_dir`` (``None``: this checkout, as installed)."""
    env = os.environ | extra
    if code_dir is None:
        return {"env": env}
    path = os.pathsep.join(p for p in (str(code_dir), env.get("PYTHONPATH", "")) if p)
    return {"env": env | {"PYTHONPATH": path}, "cwd": str(code_dir)}


def _code_side(code_dir: Path | None) -> dict:
    """Commit (``git describe --always --dirty``) of the checkout and the folder the package
    is imported from, as the detect runs of that side will see it."""
    probe = subprocess.run(
        [sys.executable, "-c", "import SpatialMSMALib, pathlib; "
         "print(pathlib.Path(SpatialMSMALib.__file__).resolve().parent.parent)"],
        capture_output=True, text=True, **_code_environment(code_dir, {}))
    if probe.returncode != 0:
        raise SystemExit(f"cannot import SpatialMSMALib from '{code_dir or '.'}': "
                         f"{probe.stderr.strip().splitlines()[-1:]}")
    imported_from = probe.stdout.strip()
    describe = subprocess.run(["git", "-C", imported_from, "describe", "--always", "--dirty"],
                              capture_output=True, text=True)
    return {"commit": describe.stdout.strip() if describe.returncode == 0 else "unknown",
            "imported_from": imported_from}


if __name__ == "__main__":
    main()
