"""Plot training and validation DSM loss curves from one or more ``log.csv`` files.

    python benchmarks/plot_training.py runs/score/log.csv [more.csv ...] --out curve.png
        [--labels "3D 2 mm" "Fashion-MNIST"]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_log(path: Path) -> dict[str, np.ndarray]:
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    step = np.array([int(r["step"]) for r in rows])
    train = np.array([float(r["train_loss"]) for r in rows])
    seconds = np.array([float(r["seconds"]) for r in rows])
    val_rows = [r for r in rows if r["val_loss"]]
    return {
        "step": step,
        "train": train,
        "seconds": seconds,
        "val_step": np.array([int(r["step"]) for r in val_rows]),
        "val": np.array([float(r["val_loss"]) for r in val_rows]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", type=Path, nargs="+")
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [str(p.parent.name) for p in args.logs]
    fig, axes = plt.subplots(1, len(args.logs), figsize=(5 * len(args.logs), 3.6), squeeze=False)
    for ax, path, label in zip(axes[0], args.logs, labels, strict=True):
        log = read_log(path)
        window = max(1, len(log["train"]) // 100)
        smooth = np.convolve(log["train"], np.ones(window) / window, mode="valid")
        ax.plot(log["step"][window - 1 :], smooth, lw=1, alpha=0.6,
                label=f"train (running mean of {window})")
        ax.plot(log["val_step"], log["val"], "o-", ms=3, label="validation (EMA weights)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("DSM loss")
        ax.set_title(f"{label}: {log['step'][-1]} steps, {log['seconds'][-1] / 60:.0f} min")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
