"""What detection gives without a brain mask: the same scans with and without theirs.

    python benchmarks/without_mask.py --manifest benchmark/manifest.json [--model MODEL] \\
        [--model-without-mask MODEL] \\
        [--splits test_healthy test_lesioned] [--limit 3] [--sample] \\
        [--out results/without_mask.json] [--overwrite]

A clinician in Slicer or the browser rarely has a brain mask; the benchmark (``spatial_3d.py``)
and the demo give every scan the simulator's. Here each scan goes through the product's
``detection.detect`` twice, the whole path from the native files, once with its brain mask
and once without (``brain extraction: atlas``, the template's mask through the affine
registration), at the model's default operating point. Both runs are scored against the
simulated lesions inside the scan's true brain mask (``metrics.evaluate_case``): flagged
volume, lesion TPR / PPV, Dice and voxel AUROC per scan, and per variant the split summary
(healthy median flagged mL, pooled TPR for lesions >= 0.5 mL). A scan whose registration is
refused in one variant is listed with the reason. ``--sample`` adds the demo's sample
subject (1 mm, seed 7). No threshold is set from the truth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cohort_args import exit_with, refuse_existing_output  # noqa: E402

from SpatialMSMALib.cohort import load_manifest  # noqa: E402
from SpatialMSMALib.errors import InputError, RegistrationError  # noqa: E402
from SpatialMSMALib.io import load_volume, write_text_atomically  # noqa: E402
from SpatialMSMALib.metrics import evaluate_case, split_summary  # noqa: E402

SPLITS = ("test_healthy", "test_lesioned", "loao_healthy", "loao_lesioned")
VARIANTS = ("with_mask", "without_mask")


def scan_pair(models: dict, files: dict, device: str) -> dict:
    """Detection of one scan with and without its brain mask (``models``: the model of each
    variant, ``{"with_mask": m1, "without_mask": m2}``, the same T1 + T2 channels), each
    scored against its lesions inside the true brain mask. ``files``: ``t1``, ``t2``,
    ``brain_mask``, ``lesion_mask`` paths. Returns ``{variant: {metrics..., "seconds"} or
    {"refused"}}``."""
    from SpatialMSMALib.detection import detect

    t1 = load_volume(files["t1"], what="T1")
    t2 = load_volume(files["t2"], what="T2")
    mask = load_volume(files["brain_mask"], what="brain mask")
    truth = load_volume(files["lesion_mask"], what="lesion mask", allow_empty=True)
    true_brain = mask.data > 0
    out = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        try:
            detection = detect(models[variant], t1, t2,
                               mask if variant == "with_mask" else None, device=device)
        except RegistrationError as e:
            out[variant] = {"refused": str(e)}
            continue
        record = evaluate_case(detection.labels > 0, truth.data > 0, truth.spacing,
                               detection.heat, true_brain)
        record.update(flagged_outside_true_brain_ml=float(
                          ((detection.labels > 0) & ~true_brain).sum()
                          * np.prod(truth.spacing) / 1000),
                      brain_mask_ml=float(detection.brain_mask.sum()
                                          * np.prod(truth.spacing) / 1000),
                      warnings=list(detection.warnings),
                      seconds=round(time.perf_counter() - start, 1))
        out[variant] = record
    return out


def summaries(cases: list[dict]) -> dict:
    """Per variant, ``metrics.split_summary`` over the scans neither variant refused, and
    the number refused."""
    both = [c for c in cases if all("refused" not in c[v] for v in VARIANTS)]
    return {variant: {"n_scans": len(both),
                      "n_refused": sum("refused" in c[variant] for c in cases),
                      **split_summary([c[variant] for c in both])}
            for variant in VARIANTS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--splits", nargs="+", choices=SPLITS,
                        default=["test_healthy", "test_lesioned"])
    parser.add_argument("--limit", type=int, help="first N scans of each split")
    parser.add_argument("--sample", action="store_true",
                        help="also the demo's sample subject (1 mm, seed 7)")
    parser.add_argument("--model", type=Path,
                        help="model file for both variants (default: the bundled model for "
                             "scans with a brain mask, and the one for scans without)")
    parser.add_argument("--model-without-mask", type=Path,
                        help="model file for the variant without a mask (default: --model, or "
                             "the bundled one for scans without a brain mask)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        from SpatialMSMALib.demo import make_sample
        from SpatialMSMALib.inference import select_device
        from SpatialMSMALib.model import resolve_model

        refuse_existing_output(args)
        device = select_device(args.device)
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be at least 1, not {args.limit}")
        manifest = load_manifest(args.manifest)
        root = Path(manifest["root"])
        models = {"with_mask": resolve_model(args.model, has_t2=True, has_mask=True),
                  "without_mask": resolve_model(args.model_without_mask or args.model,
                                                has_t2=True, has_mask=False)}
        if any(len(m.channel_names) != 2 for m in models.values()):
            raise InputError("both models must be T1 + T2 models")
        jobs = []
        for split in args.splits:
            subjects = [s for s in manifest["subjects"] if s["split"] == split]
            for s in subjects[:args.limit]:
                jobs.append((split, s["id"], {k: root / s[k] for k in
                                              ("t1", "t2", "brain_mask", "lesion_mask")}))
        result = {"model": str(args.model or "bundled default"),
                  "model_without_mask": str(args.model_without_mask or args.model
                                            or "bundled default for scans without a mask"),
                  "brain_masks": {v: m.brain_masks for v, m in models.items()},
                  "manifest": str(args.manifest), "splits": {}}
        with tempfile.TemporaryDirectory() as folder:
            if args.sample:
                sample = make_sample(Path(folder), seed=7, spacing=1.0)
                jobs.append(("demo_sample", "sample_seed7_1mm",
                             dict(sample["paths"])))
            for split, scan_id, files in jobs:
                pair = scan_pair(models, files, device)
                pair["id"] = scan_id
                result["splits"].setdefault(split, {"cases": []})["cases"].append(pair)
                if args.out:  # each scan's records as they come: minutes of work each
                    write_text_atomically(args.out, json.dumps(result, indent=1) + "\n")
                print(f"{split} {scan_id}: " + "; ".join(
                    f"{v} " + (f"refused ({pair[v]['refused'][:60]})" if "refused" in pair[v]
                               else f"{pair[v]['flagged_ml']:.1f} mL, TPR {pair[v]['tpr']:.2f} "
                                    f"PPV {pair[v]['ppv']:.2f} AUROC "
                                    f"{pair[v].get('auroc', float('nan')):.3f}")
                    for v in VARIANTS), flush=True)
        for entry in result["splits"].values():
            entry["summary"] = summaries(entry["cases"])
        result["machine"] = {"cpus": os.cpu_count(),
                             "platform": platform.platform()}
        text = json.dumps(result, indent=1)
        if args.out:
            write_text_atomically(args.out, text + "\n")
        for split, entry in result["splits"].items():
            for variant, s in entry["summary"].items():
                healthy = s.get("healthy", {}).get("median_flagged_ml")
                print(f"{split:14s} {variant:13s} scans {s['n_scans']} refused {s['n_refused']}"
                      f" healthy median {healthy if healthy is None else round(healthy, 2)} mL,"
                      f" TPR >= 0.5 mL {s.get('pooled_tpr_lesions_ge_0.5ml')}")
    except InputError as e:
        exit_with(e)


if __name__ == "__main__":
    main()
