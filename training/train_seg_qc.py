"""Train a segmentation-QC model (GNSM on tissue label maps, conditioned on the T1).

    python training/train_seg_qc.py --manifest benchmark --out runs/seg_qc [--steps 1200 ...]
    python training/train_seg_qc.py --data-dir maps/ --out runs/seg_qc
    python training/train_seg_qc.py --manifest benchmark --out runs/seg_qc --resume
    python training/train_seg_qc.py --manifest benchmark --out runs/seg_qc --bundle
    python training/train_seg_qc.py --install runs/seg_qc/seg_qc.pt     # bundle an existing model

Good maps only: the ``train`` split of a benchmark manifest (subjects with a ``tissue`` map)
or the ``<id>_t1`` + ``<id>_tissue`` pairs of a folder; the ``val`` split (or the first 10% of
the folder) gives the good-map score distribution stored in the model for percentiles and the
flag rule, scored through the same path as ``spatial-msma seg-qc`` (native files, T1-only
preprocessing with the subject's brain mask when there is one). Scans are preprocessed into
model space once (cached under ``OUT/cache``). Every field of
:class:`~SpatialMSMALib.segqc.model.SegQCConfig` is an option.

Writes ``OUT/seg_qc.pt`` (the model ``spatial-msma seg-qc --model`` loads), ``OUT/training.pt``
(resumable state, every 100 steps and on Ctrl-C) and ``OUT/log.csv``. ``--bundle`` also
installs the model as ``Resources/Models/seg_qc.pt`` and describes it under ``seg_qc`` in the
registry (file, SHA-256, training data, measured cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from SpatialMSMALib.errors import InputError
from SpatialMSMALib.io import check_output_folder
from SpatialMSMALib.segqc.data import (
    cohort_label_maps,
    folder_label_maps,
    model_space_label_maps,
)
from SpatialMSMALib.segqc.model import SegQCConfig, TrainingMap, train_seg_qc
from SpatialMSMALib.segqc.pipeline import calibrate_native
from SpatialMSMALib.training_utils import training_device


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SegQCConfig):
        default = f.default
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(name, type=type(default[0]), nargs="+", default=list(default))
        else:
            parser.add_argument(name, type=type(default), default=default)


def load_maps(args, cache: Path, spacing: float) -> tuple[list, list, list]:
    """Training maps, validation maps (model space) and the validation ``(tissue, t1)``
    native file pairs (for the calibration through the seg-qc path)."""
    if args.manifest:
        from SpatialMSMALib.cohort import load_manifest

        maps = cohort_label_maps(args.manifest, ("train", "val"), cache, spacing, images=True)
        train, val = maps["train"], maps["val"]
        manifest = load_manifest(args.manifest)
        root = Path(manifest["root"])
        pairs = [(root / s["tissue"], root / s["t1"],
                  root / s["brain_mask"] if s.get("brain_mask") else None)
                 for s in manifest["subjects"] if s["split"] == "val"]
    else:
        scans, tissue = folder_label_maps(args.data_dir)
        entries = model_space_label_maps(scans, tissue, cache, spacing, images=True)
        n_val = max(1, len(entries) // 10) if len(entries) > 1 else 0
        train, val = entries[n_val:] or entries, entries[:n_val] or entries
        val_scans = scans[:n_val] or scans
        pairs = [(tissue[s.id], s.t1, s.brain_mask) for s in val_scans]
    return [TrainingMap(*e) for e in train], [TrainingMap(*e) for e in val], pairs


def bundle(model_path: Path, model, source: str, seconds: float | None) -> None:
    from SpatialMSMALib.model import MODEL_DIR, REGISTRY

    target = MODEL_DIR / "seg_qc.pt"
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(model_path, partial)
    partial.replace(target)  # atomic: the bundled model is never half-written
    registry = json.loads(REGISTRY.read_text()) if REGISTRY.exists() else {"models": []}
    registry["seg_qc"] = {
        "file": target.name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "size_bytes": target.stat().st_size,
        "labels": {"0": "background", "1": "CSF", "2": "GM", "3": "WM"},
        "image": "T1 (registered to MNI152 2009a, affine)",
        "grid": {"spacing_mm": model.config.spacing_mm, "shape": list(model.config.shape)},
        "training_data": {
            "source": source,
            "train_maps": len(model.info.get("train_ids", [])),
            "val_maps": len(model.info.get("val_ids", [])),
            "description": "tissue maps of synthetic variations of a few real anatomies "
                           "(benchmark cohort); research use only, not for clinical use",
        },
        "training_seconds_2_cpu_cores": round(seconds) if seconds else None,
        "read_out": model.config.readout,
        "network": {"channels": list(model.config.channels),
                    "noise_levels": model.config.num_levels,
                    "training_steps": model.info.get("steps")},
        "good_scores": {"n": len(model.good_scores),
                        "min": float(model.good_scores.min()),
                        "max": float(model.good_scores.max())},
    }
    tmp = REGISTRY.with_name(".registry.json.partial")
    tmp.write_text(json.dumps(registry, indent=1) + "\n")
    tmp.replace(REGISTRY)
    print(f"installed {target} ({target.stat().st_size / 1e6:.2f} MB); updated {REGISTRY}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="benchmark manifest (file or folder)")
    source.add_argument("--data-dir", type=Path, help="folder of <id>_t1 + <id>_tissue NIfTI")
    source.add_argument("--install", type=Path, metavar="MODEL",
                        help="no training: install this QC model file as the bundled one")
    parser.add_argument("--out", type=Path, help="output folder (required for training)")
    parser.add_argument("--cache", type=Path,
                        help="model-space cache folder (default OUT/cache; share it with "
                             "train_score.py's to skip preprocessing)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resume", action="store_true", help="continue from OUT/training.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/seg_qc.pt")
    parser.add_argument("--bundle", action="store_true",
                        help="install the result as the bundled QC model")
    _add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.install:
        from SpatialMSMALib.segqc.model import SegQCModel

        try:
            model = SegQCModel.load(args.install)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        bundle(args.install, model, model.info.get("source", "benchmark cohort"),
               model.info.get("training_seconds"))
        return 0
    if args.out is None:
        parser.error("--out is required for training")
    try:
        config = SegQCConfig(**{f.name: getattr(args, f.name)
                                for f in dataclasses.fields(SegQCConfig)})
        check_output_folder(args.out, "--out")
        model_path = args.out / "seg_qc.pt"
        if model_path.exists() and not args.overwrite:
            raise InputError(f"'{model_path}' already exists; pass --overwrite to replace it")
        train, val, val_pairs = load_maps(args, args.cache or args.out / "cache",
                                          config.spacing_mm)
        shapes = {m.labels.shape for m in train + val}
        if shapes != {tuple(config.shape)}:
            raise InputError(f"model-space maps have shapes {shapes}, config says {config.shape}")
        args.out.mkdir(parents=True, exist_ok=True)
        log_path = args.out / "log.csv"
        if not (args.resume and log_path.exists()):
            log_path.write_text("step,loss,lr,seconds\n")

        def log(entry: dict) -> None:
            with open(log_path, "a") as f:
                f.write(f"{entry['step']},{entry['loss']:.6f},{entry['lr']:.6g},"
                        f"{entry['seconds']:.1f}\n")

        start = time.perf_counter()
        model = train_seg_qc(train, val, config, device=training_device(args.device),
                             checkpoint_path=args.out / "training.pt", resume=args.resume,
                             log=log)
        # percentiles must compare like with like: score the validation maps through the
        # path 'spatial-msma seg-qc' takes (T1-only preprocessing, native files)
        calibrate_native(model, val_pairs)
        seconds = time.perf_counter() - start
        model.info["training_seconds"] = seconds
        model.info["source"] = str(args.manifest or args.data_dir)
        model.save(model_path, overwrite=args.overwrite)
        print(f"done in {seconds / 60:.1f} min; good validation scores "
              f"{model.good_scores.min():.4f}..{model.good_scores.max():.4f}; wrote {model_path}")
        if args.bundle:
            bundle(model_path, model, model.info["source"], seconds)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; state saved, continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
