"""Small pieces shared by the training engines (score model, Spatial-MSMA flow)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to ``floor`` at
    ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def parse_boolean(text: str) -> bool:
    """Command-line boolean: true/1/yes or false/0/no (any case); anything else is an error
    (``argparse`` reports it with the option's name)."""
    import argparse

    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def training_device(device: str = "auto") -> str:
    """``auto`` -> CUDA when available; under torchrun each process takes the GPU of its
    ``LOCAL_RANK`` (and makes it current). ``cpu`` and ``cuda:N`` are taken as given; any
    other name, or CUDA on a machine without it, is an ``InputError``
    (:func:`inference.select_device`)."""
    from .inference import select_device

    chosen = select_device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(chosen)
    return str(chosen)


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state_keys": {}}
    for index, entry in state["state"].items():
        plain["state_keys"][str(index)] = []
        for key, value in entry.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value)
            plain["state_keys"][str(index)].append(key)
    return tensors, plain


def _unflatten_optimizer(tensors: dict, plain: dict) -> dict:
    state = {
        int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in plain["state_keys"].items()
    }
    return {"state": state, "param_groups": plain["param_groups"]}


def wrap_ddp(module, device, distributed: bool):
    """``module`` itself, or wrapped in DistributedDataParallel under torchrun."""
    if not distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def stored_config(config) -> dict:
    """A dataclass config as it comes back from a checkpoint (tuples become lists), for
    checking that a resumed run uses the configuration it was trained with."""
    return json.loads(json.dumps(asdict(config)))


def same_config(stored: dict, config) -> bool:
    """Whether a checkpoint's ``stored`` config is ``config``; options added to the config
    class after the checkpoint was written count as equal when they hold their default."""
    import dataclasses

    expected = stored_config(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config)
                if f.default is not dataclasses.MISSING}
    filled = dict(stored)
    for key, value in expected.items():
        if key not in filled and key in defaults and value == defaults[key]:
            filled[key] = value
    return filled == expected


def trainer_state(trainer) -> tuple[dict, dict]:
    """``(extra, states)`` checkpoint parts shared by the trainers: step, best validation
    value, learning-rate schedule, optimiser (tensors and plain data) and random generator."""
    optimizer_tensors, optimizer_plain = _flatten_optimizer(trainer.optimizer.state_dict())
    extra = {"step": trainer.step, "best_val": trainer.best_val,
             "lr_schedule": trainer.lr_schedule.state_dict(), "optimizer": optimizer_plain}
    states = {"optimizer": optimizer_tensors,
              "rng": {"generator": trainer.generator.get_state()}}
    return extra, states


def restore_trainer_state(trainer, checkpoint: dict, path) -> None:
    """Inverse of ``trainer_state``; refuses a checkpoint trained with another config."""
    if not same_config(checkpoint["config"], trainer.config):
        raise ValueError(f"checkpoint '{path}' was trained with another configuration")
    extra = checkpoint["extra"]
    trainer.optimizer.load_state_dict(
        _unflatten_optimizer(checkpoint["states"]["optimizer"], extra["optimizer"]))
    trainer.lr_schedule.load_state_dict(extra["lr_schedule"])
    trainer.generator.set_state(checkpoint["states"]["rng"]["generator"])
    trainer.step = int(extra["step"])
    trainer.best_val = float(extra["best_val"])
