"""Held-out likelihood of the MSMA GMM on healthy score norms, per covariance regulariser.

    python benchmarks/typicality_reg_covar.py --features CACHE/features_<...>_f2 \\
        [--levels every:2] [--out results/typicality_reg_covar.json]

The typicality GMM (``typicality.GaussianMixtureDensity``) adds ``reg_covar`` (default 1e-4)
to the diagonal of each covariance of the standardised log norms. A larger value would make
the verdicts less sensitive to small feature changes, and the label-free way to choose it is
the one the GMM already uses for its number of components: the mean held-out
log-likelihood of healthy scans over 5 folds (standardisation fitted on each training part).
Reads the whole-brain norms of a feature cache folder (``<id>.npz``, as
``inference.cached_features`` writes them: healthy scans only) and prints that likelihood
for each regulariser and 1 or 2 components, on all levels or on ``--levels``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from cohort_args import exit_with, refuse_existing_output  # noqa: E402
from fit_msma import typicality_levels  # noqa: E402

from SpatialMSMALib.errors import InputError  # noqa: E402
from SpatialMSMALib.io import write_text_atomically  # noqa: E402

REGULARISERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def held_out_log_likelihood(logs: np.ndarray, reg_covar: float, components: int,
                            folds: int = 5, seed: int = 0) -> list[float]:
    """Mean held-out log-likelihood per fold of a full-covariance GMM on standardised
    ``logs (N, L)`` (mean and SD from each fold's training part)."""
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import KFold

    out = []
    for train, held in KFold(folds, shuffle=True, random_state=seed).split(logs):
        mean, sd = logs[train].mean(0), logs[train].std(0) + 1e-6
        gmm = GaussianMixture(components, covariance_type="full", reg_covar=reg_covar,
                              random_state=seed, n_init=2).fit((logs[train] - mean) / sd)
        out.append(float(gmm.score((logs[held] - mean) / sd)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--levels", default="all")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        refuse_existing_output(args)
        files = sorted(args.features.glob("*.npz"))
        if len(files) < 10:
            raise InputError(f"'{args.features}': {len(files)} feature files, need >= 10")
        norms = np.stack([np.load(f)["whole"] for f in files]).astype(np.float64)
        levels = typicality_levels(args.levels, norms.shape[1]) or list(range(norms.shape[1]))
    except (InputError, KeyError, OSError, ValueError) as e:
        exit_with(e if isinstance(e, InputError) else InputError(
            f"'{args.features}': not a feature cache folder ({e})"))
    logs = np.log(norms[:, levels])
    result = {"command": " ".join(sys.argv), "n_scans": len(files), "levels": levels,
              "held_out_log_likelihood": []}
    for reg_covar in REGULARISERS:
        for components in (1, 2):
            lls = held_out_log_likelihood(logs, reg_covar, components)
            row = {"reg_covar": reg_covar, "components": components,
                   "mean": float(np.mean(lls)), "fold_min": float(np.min(lls))}
            result["held_out_log_likelihood"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        write_text_atomically(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
