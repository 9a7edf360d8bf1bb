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

import numpy as np
import torch

from SpatialMSMALib.errors import InputError
from SpatialMSMALib.score.training import ScoreTrainConfig, ScoreTrainer


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(ScoreTrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(
                name, type=lambda v: v.lower() in ("1", "true", "yes"), default=default
            )
        elif isinstance(default, list):
            parser.add_argument(name, type=type(default[0]), nargs="+", default=default)
        else:
            parser.add_argument(name, type=type(default), default=default)


def scan_triples(args) -> dict[str, list[tuple[str, Path, Path | None, Path | None]]]:
    """(id, t1, t2, mask) per split ("train", "val") from a manifest or a folder."""
    if args.manifest:
        from SpatialMSMALib.cohort import load_manifest

        manifest = load_manifest(args.manifest)
        root = Path(manifest["root"])
        out = {"train": [], "val": []}
        for s in manifest["subjects"]:
            if s["split"] in out:
                out[s["split"]].append(
                    (s["id"], root / s["t1"], root / s["t2"], root / s["brain_mask"])
                )
        return out
    folder = Path(args.data_dir)
    t1s = sorted(folder.glob("*_t1.nii*"))
    if not t1s:
        raise InputError(f"no '*_t1.nii[.gz]' files in '{folder}'")
    rows = []
    for t1 in t1s:
        stem = t1.name.split("_t1.nii")[0]
        suffix = t1.name[len(stem) + 3 :]
        t2 = folder / f"{stem}_t2{suffix}"
        mask = folder / f"{stem}_brainmask{suffix}"
        rows.append((stem, t1, t2 if t2.exists() else None, mask if mask.exists() else None))
    n_val = max(1, len(rows) // 10) if len(rows) > 1 else 0
    return {"train": rows[n_val:] or rows, "val": rows[:n_val] or rows}


def load_model_space(
    rows, cache_dir: Path, spacing: float, progress: bool = True
) -> list[torch.Tensor]:
    """Preprocess (or read from the cache) each scan; returns ``(C, X, Y, Z)`` tensors."""
    from SpatialMSMALib.io import load_volume
    from SpatialMSMALib.preprocessing import PreprocessConfig, preprocess_scan
    from SpatialMSMALib.template import DEFAULT_SHAPE, DEFAULT_SPACING_MM

    shape = tuple(int(round(s * DEFAULT_SPACING_MM / spacing)) for s in DEFAULT_SHAPE)
    cache_dir.mkdir(parents=True, exist_ok=True)
    volumes = []
    from tqdm import tqdm

    for subject_id, t1, t2, mask in tqdm(rows, desc="preprocess", disable=not progress):
        cached = cache_dir / f"{subject_id}_{spacing:g}mm.npz"
        if cached.exists():
            image = np.load(cached)["image"]
        else:
            result = preprocess_scan(
                load_volume(t1, what="T1"),
                load_volume(t2, what="T2") if t2 else None,
                load_volume(mask, what="brain mask") if mask else None,
                PreprocessConfig(spacing_mm=spacing, shape=shape),
                names={"t1": t1, "t2": t2, "mask": mask},
            )
            image = result.image
            tmp = cached.with_name(cached.name + ".partial.npz")
            np.savez(tmp, image=image)
            tmp.replace(cached)
        volumes.append(torch.from_numpy(np.asarray(image, np.float32)))
    return volumes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="benchmark manifest (file or folder)")
    source.add_argument("--data-dir", type=Path, help="folder of *_t1/_t2/_brainmask NIfTI")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spacing", type=float, default=2.0, help="model grid spacing (mm)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
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
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    import torch.distributed as dist

    if world_size > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        splits = scan_triples(args)
        cache = args.out / "cache"
        if world_size > 1 and rank != 0:
            dist.barrier()  # rank 0 fills the preprocessing cache first
        train = load_model_space(splits["train"], cache, args.spacing, rank == 0)
        val = load_model_space(splits["val"], cache, args.spacing, rank == 0)
        if world_size > 1 and rank == 0:
            dist.barrier()
        trainer = ScoreTrainer(
            config, train, val, args.out, device=device, rank=rank, distributed=world_size > 1
        )
        if args.resume and (args.out / "last.pt").exists():
            trainer.resume(args.out / "last.pt")
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
