"""Cost of QC for several label maps of one scan: one ``seg-qc`` call or one call per map.

    python benchmarks/seg_qc_several_maps.py --manifest benchmark --subject test_healthy_000 \\
        [--maps 3] [--repeats 3] [--out results/seg_qc_several_maps.json] [--overwrite]

The subject's tissue map and copies shifted by 1, 2, ... voxels along the first axis (what a
worse segmentation tool might give) are scored with the bundled QC model and the subject's
brain mask, (a) by ``--maps`` separate ``spatial-msma seg-qc`` processes, one per map, and
(b) by one process given every map (one preprocessing of the T1). The two ways alternate in
each round; reported are the median wall seconds of each over ``--repeats`` rounds, their
ratio, and whether both gave the same QC scores (they must: the preprocessing is
deterministic).
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

from cohort_args import exit_with, manifest_subject, refuse_existing_output  # noqa: E402

from SpatialMSMALib.errors import InputError  # noqa: E402


def run_seg_qc(labels: list[Path], t1: Path, mask: Path) -> tuple[float, list[float]]:
    """Wall seconds of one ``spatial-msma seg-qc --json`` process and its QC scores."""
    command = [sys.executable, "-m", "SpatialMSMALib.cli", "seg-qc", "--labels",
               *map(str, labels), "--image", str(t1), "--mask", str(mask), "--json",
               "--device", "cpu"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise InputError(f"seg-qc failed: {result.stderr.strip()[-500:]}")
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return seconds, [r["qc_score"] for r in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--subject", default="test_healthy_000")
    parser.add_argument("--maps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    if args.maps < 2 or args.repeats < 1:
        parser.error("--maps must be at least 2 and --repeats at least 1")
    try:
        refuse_existing_output(args)
        from SpatialMSMALib.io import load_volume, save_volume

        _, root, entry = manifest_subject(args.manifest, args.subject)
        tissue = load_volume(root / entry["tissue"], what="tissue map")
        with tempfile.TemporaryDirectory() as folder:
            labels = [root / entry["tissue"]] + [
                save_volume(Path(folder) / f"shifted{k}.nii.gz",
                            np.roll(tissue.data, k, axis=0), tissue.affine)
                for k in range(1, args.maps)]
            t1, mask = root / entry["t1"], root / entry["brain_mask"]
            runs = {"one_call_per_map": [], "one_call_for_all": []}
            scores = {}
            for _ in range(args.repeats):
                separate = [run_seg_qc([path], t1, mask) for path in labels]
                runs["one_call_per_map"].append(sum(s for s, _ in separate))
                scores["one_call_per_map"] = [q[0] for _, q in separate]
                seconds, scores["one_call_for_all"] = run_seg_qc(labels, t1, mask)
                runs["one_call_for_all"].append(seconds)
    except InputError as e:
        exit_with(e)
    medians = {name: float(np.median(values)) for name, values in runs.items()}
    result = {
        "subject": args.subject, "maps": args.maps, "median_s": medians, "runs_s": runs,
        "ratio_all_to_per_map": medians["one_call_for_all"] / medians["one_call_per_map"],
        "qc_scores": scores,
        "same_scores": scores["one_call_per_map"] == scores["one_call_for_all"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"{args.maps} maps: one call per map {medians['one_call_per_map']:.1f} s, one call "
          f"for all {medians['one_call_for_all']:.1f} s (ratio "
          f"{result['ratio_all_to_per_map']:.2f}; medians of {args.repeats}); same scores: "
          f"{result['same_scores']}")
    if args.out:
        from SpatialMSMALib.io import write_text_atomically

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
