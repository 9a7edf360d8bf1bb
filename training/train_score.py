"""Train the noise-conditional score model.

    python training/train_score.py --manifest benchmark --out runs/score [--steps 3000 ...]
    python training/train_score.py --data-dir scans/ --out runs/score
    torchrun --nproc_per_node=N training/train_score.py --manifest benchmark --out runs/score

Scans are preprocessed into model space once (``preprocess_scan``; cached as .npz under
``OUT/cache``). Every field of ``ScoreTrainConfig`` is a command-line option. ``--resume``
continues from ``OUT/last.pt``. Under torchrun the model is wrapped in DDP (NCCL on GPUs,
gloo on CPU); rank 0 validates and writes checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from SpatialMSMALib.dataset import (
    ScanFiles,
    check_refused,
    folder_scans,
    model_space,
    pooled_manifest_scans,
)
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.io import check_output_folder
from SpatialMSMALib.score.training import ScoreTrainConfig, ScoreTrainer
from SpatialMSMALib.training_utils import parse_boolean, training_device


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ScoreTrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(name, type=parse_boolean, default=default)
        elif isinstance(default, list):
            parser.add_argument(name, type=type(default[0]), nargs="+", default=default)
        else:
            parser.add_argument(name, type=type(default), default=default)


def cohort_record(manifests) -> str | list[str]:
    """The ``--manifest`` value(s) for a model's provenance: one path, or the list."""
    return str(manifests[0]) if len(manifests) == 1 else [str(m) for m in manifests]


def scan_lists(args) -> dict[str, list[ScanFiles]]:
    """``train`` / ``val`` scans from one or more manifests (pooled, see
    ``dataset.pooled_manifest_scans``), or from a folder (first 10% -> val)."""
    if args.manifest:
        return pooled_manifest_scans(args.manifest, ("train", "val"))
    rows = folder_scans(args.data_dir)
    n_val = max(1, len(rows) // 10) if len(rows) > 1 else 0
    return {"train": rows[n_val:] or rows, "val": rows[:n_val] or rows}


def load_model_space(rows, cache_dir: Path, spacing: float, progress: bool,
                     channels: int | None = None, refused: list | None = None
                     ) -> list[torch.Tensor]:
    """Model-space images of ``rows``; scans whose registration is refused are left out and
    noted in ``refused`` (see ``dataset.model_space``)."""
    return [torch.from_numpy(s.image)
            for s in model_space(rows, cache_dir, spacing, progress, channels=channels,
                                 refused=refused)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, nargs="+",
                        help="benchmark manifest(s) (file or folder); several are pooled")
    source.add_argument("--data-dir", type=Path, help="folder of *_t1/_t2/_brainmask NIfTI")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spacing", type=float, default=2.0, help="model grid spacing (mm)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="warm start: begin from this score checkpoint's EMA weights (or "
                             "a model file's score network) with a fresh optimiser and "
                             "schedule (same network and noise levels), e.g. to extend a "
                             "finished run")
    parser.add_argument("--t1-only", action="store_true",
                        help="train on the T1 channel only (a model for scans without T2)")
    parser.add_argument(
        "--save-rank-weights",
        action="store_true",
        help="(testing) each rank writes its final weights to OUT/rank<R>.pt",
    )
    _add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = ScoreTrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreTrainConfig)}
    )

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        device = training_device(args.device)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if world_size > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        check_output_folder(args.out, "--out")
        splits = scan_lists(args)
        cache = args.out / "cache"
        if world_size > 1 and rank != 0:
            dist.barrier()  # rank 0 fills the preprocessing cache first
        channels = 1 if args.t1_only else None
        refused: list = []
        train = load_model_space(splits["train"], cache, args.spacing, rank == 0, channels,
                                 refused)
        val = load_model_space(splits["val"], cache, args.spacing, rank == 0, channels, refused)
        if world_size > 1 and rank == 0:
            dist.barrier()
        # after the barrier: every rank has read the same refusals and raises alike
        check_refused(refused, len(splits["train"]) + len(splits["val"]), report=rank == 0)
        if not train or not val:
            raise InputError("no training or no validation scan left after registration")
        trainer = ScoreTrainer(
            config, train, val, args.out, device=device, rank=rank, distributed=world_size > 1
        )
        if args.resume and (args.out / "last.pt").exists():
            trainer.resume(args.out / "last.pt")
        elif args.init_from is not None:
            trainer.initialise_from(args.init_from)
        result = trainer.run(progress=rank == 0)
        if args.save_rank_weights:
            torch.save(trainer.model.state_dict(), args.out / f"rank{rank}.pt")
        if rank == 0:
            print(
                f"done: step {trainer.step}, train loss {result['train_loss']:.4f}, "
                f"best val {trainer.best_val:.4f}; checkpoints in {args.out}"
            )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
