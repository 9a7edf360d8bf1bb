"""MSMA typicality: auxiliary density models on score-norm feature vectors.

A score model turns an input into an L-vector of score norms (one per noise level); these
models learn what that vector looks like for healthy (inlier) inputs and score new ones:

- ``GaussianMixtureDensity``: full-covariance Gaussian mixture, number of components chosen
  by cross-validated held-out likelihood; score = negative log-likelihood.
- ``KNearestNeighbourDistance``: Euclidean distance to the k-th nearest healthy vector.
- ``FlowDensity``: a small masked autoregressive flow (nflows); score = negative
  log-likelihood.

``TypicalityModel`` bundles a feature transform (log, then standardisation with the healthy
mean and SD: norms span orders of magnitude across noise levels), the fitted models, and each
model's scores on healthy inputs it was not fitted on, so that a new score can be reported as a
percentile of the healthy reference and turned into a verdict. Everything is stored as plain
arrays (``to_state`` / ``from_state``), so it travels in a safe checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

VERDICT_PERCENTILES = {"borderline": 95.0, "atypical": 99.0}
MODEL_NAMES = ("gmm", "knn", "flow")


class GaussianMixtureDensity:
    """Gaussian mixture on feature vectors ``(N, L)``; ``score`` is the negative
    log-likelihood (nats). Evaluated with its own numpy code from the stored parameters."""

    name = "gmm"

    def __init__(self, weights, means, precision_cholesky):
        self.weights = np.asarray(weights, np.float64)  # (K,)
        self.means = np.asarray(means, np.float64)  # (K, L)
        self.precision_cholesky = np.asarray(precision_cholesky, np.float64)  # (K, L, L)

    @property
    def n_components(self) -> int:
        return len(self.weights)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        candidates: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16),
        folds: int = 5,
        seed: int = 0,
        reg_covar: float = 1e-4,
        selection_rows: int | None = None,
        n_init: int = 2,
    ) -> GaussianMixtureDensity:
        """Pick the number of components with the best mean held-out log-likelihood over
        ``folds`` folds, then refit on everything.

        ``selection_rows``: choose the number of components on a random subset of this many
        rows (large tables), then refit on all rows.
        """
        from sklearn.mixture import GaussianMixture
        from sklearn.model_selection import KFold

        all_features = features
        if selection_rows is not None and len(features) > selection_rows:
            pick = np.random.default_rng(seed).choice(len(features), selection_rows, False)
            features = features[pick]
        n, d = features.shape
        folds = max(2, min(folds, n // 2))
        best, best_ll = 1, -np.inf
        for k in candidates:
            # every fold's training part must have several samples per free parameter block
            if k * (d + 1) > n * (folds - 1) / folds:
                break
            lls = []
            for train, held in KFold(folds, shuffle=True, random_state=seed).split(features):
                gmm = GaussianMixture(k, covariance_type="full", reg_covar=reg_covar,
                                      random_state=seed, n_init=n_init)
                gmm.fit(features[train])
                lls.append(gmm.score(features[held]))
            if np.mean(lls) > best_ll:
                best, best_ll = k, float(np.mean(lls))
        gmm = GaussianMixture(best, covariance_type="full", reg_covar=reg_covar,
                              random_state=seed, n_init=n_init).fit(all_features)
        return cls(gmm.weights_, gmm.means_, gmm.precisions_cholesky_)

    def log_likelihood(self, features: np.ndarray) -> np.ndarray:
        from scipy.special import logsumexp

        x = np.asarray(features, np.float64)
        d = x.shape[1]
        per_component = []
        for w, mu, chol in zip(self.weights, self.means, self.precision_cholesky, strict=True):
            y = (x - mu) @ chol
            log_det = np.log(np.diag(chol)).sum()
            per_component.append(
                np.log(w) - 0.5 * d * math.log(2 * math.pi) + log_det - 0.5 * (y**2).sum(1)
            )
        return logsumexp(np.stack(per_component, 1), axis=1)

    def score(self, features: np.ndarray) -> np.ndarray:
        return -self.log_likelihood(features)

    def to_state(self) -> tuple[dict, dict]:
        return {}, {
            "weights": self.weights,
            "means": self.means,
            "precision_cholesky": self.precision_cholesky,
        }

    @classmethod
    def from_state(cls, config: dict, arrays: dict) -> GaussianMixtureDensity:
        return cls(arrays["weights"], arrays["means"], arrays["precision_cholesky"])


class KNearestNeighbourDistance:
    """Distance to the k-th nearest healthy feature vector (k = 5 as in MSMA)."""

    name = "knn"

    def __init__(self, reference: np.ndarray, k: int = 5):
        self.reference = np.asarray(reference, np.float64)
        self.k = int(min(k, len(self.reference) - 1))
        if self.k < 1:
            raise ValueError("the k-NN model needs at least 2 reference vectors")
        from scipy.spatial import cKDTree

        self._tree = cKDTree(self.reference)

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 5) -> KNearestNeighbourDistance:
        return cls(features, k)

    def score(self, features: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """``exclude_self``: the inputs are the reference vectors themselves (leave-one-out)."""
        k = self.k + 1 if exclude_self else self.k
        distances, _ = self._tree.query(np.asarray(features, np.float64), k=k)
        return distances.reshape(len(features), -1)[:, -1]

    def to_state(self) -> tuple[dict, dict]:
        return {"k": self.k}, {"reference": self.reference}

    @classmethod
    def from_state(cls, config: dict, arrays: dict) -> KNearestNeighbourDistance:
        return cls(arrays["reference"], config["k"])


def _build_maf(features: int, hidden: int, layers: int):
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        CompositeTransform,
        MaskedAffineAutoregressiveTransform,
        ReversePermutation,
    )

    transforms = []
    for _ in range(layers):
        transforms.append(ReversePermutation(features))
        transforms.append(MaskedAffineAutoregressiveTransform(features, hidden, num_blocks=2))
    return Flow(CompositeTransform(transforms), StandardNormal([features]))


class FlowDensity:
    """Masked autoregressive flow on feature vectors; ``score`` = negative log-likelihood.

    Trained with Adam on 90% of the vectors, early-stopped on the held-out 10%.
    """

    name = "flow"

    def __init__(self, features: int, hidden: int = 32, layers: int = 4):
        self.config = {"features": features, "hidden": hidden, "layers": layers}
        self.flow = _build_maf(features, hidden, layers).eval()

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        hidden: int = 32,
        layers: int = 4,
        max_epochs: int = 300,
        batch_size: int = 256,
        patience: int = 20,
        seed: int = 0,
    ) -> FlowDensity:
        torch.manual_seed(seed)
        model = cls(features.shape[1], hidden, layers)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(features))
        n_val = max(1, len(features) // 10)
        val = torch.as_tensor(features[order[:n_val]], dtype=torch.float32)
        train = torch.as_tensor(features[order[n_val:]], dtype=torch.float32)
        optimizer = torch.optim.Adam(model.flow.parameters(), lr=1e-3, weight_decay=1e-5)
        best, best_state, waited = np.inf, None, 0
        generator = torch.Generator().manual_seed(seed)
        for _ in range(max_epochs):
            model.flow.train()
            permutation = torch.randperm(len(train), generator=generator)
            for start in range(0, len(train), batch_size):
                batch = train[permutation[start : start + batch_size]]
                loss = -model.flow.log_prob(batch).mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.flow.parameters(), 5.0)
                optimizer.step()
            model.flow.eval()
            with torch.no_grad():
                val_nll = float(-model.flow.log_prob(val).mean())
            if val_nll < best - 1e-4:
                best, waited = val_nll, 0
                best_state = {k: v.clone() for k, v in model.flow.state_dict().items()}
            else:
                waited += 1
                if waited >= patience:
                    break
        model.flow.load_state_dict(best_state)
        model.flow.eval()
        return model

    @torch.no_grad()
    def score(self, features: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        return -self.flow.log_prob(x).double().numpy()

    def to_state(self) -> tuple[dict, dict]:
        return dict(self.config), {k: v.numpy() for k, v in self.flow.state_dict().items()}

    @classmethod
    def from_state(cls, config: dict, arrays: dict) -> FlowDensity:
        model = cls(config["features"], config["hidden"], config["layers"])
        model.flow.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()})
        model.flow.eval()
        return model


MODEL_CLASSES = {
    "gmm": GaussianMixtureDensity,
    "knn": KNearestNeighbourDistance,
    "flow": FlowDensity,
}


def _fit_model(name: str, features: np.ndarray, seed: int):
    if name == "knn":
        return KNearestNeighbourDistance.fit(features)
    return MODEL_CLASSES[name].fit(features, seed=seed)


@dataclass
class Assessment:
    """One input's typicality under one auxiliary model."""

    model: str
    score: float
    percentile: float  # of the healthy reference scores below this score, 0..100
    verdict: str  # "typical", "borderline" or "atypical"
    reference_size: int

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "score": self.score,
            "percentile": self.percentile,
            "verdict": self.verdict,
            "reference_size": self.reference_size,
        }


@dataclass
class TypicalityModel:
    """Feature transform + auxiliary models + healthy reference scores.

    Attributes:
        mean, scale: ``(L,)`` mean and SD of ``log(features)`` over the healthy fit set.
        models: name -> fitted density/distance model (on transformed features).
        reference_scores: name -> sorted scores of healthy inputs the model was not fitted on
            (a separate reference set, or out-of-fold scores from cross-fitting).
        levels: indices of the score model's noise levels this model reads (``None``: all).
            Its inputs are then full ``(N, L)`` vectors of which only these columns are read
            (the others may be NaN: a detector evaluates only the levels it needs).
    """

    mean: np.ndarray
    scale: np.ndarray
    models: dict = field(default_factory=dict)
    reference_scores: dict = field(default_factory=dict)
    levels: list | None = None

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        reference_features: np.ndarray | None = None,
        models: tuple[str, ...] = MODEL_NAMES,
        folds: int = 5,
        seed: int = 0,
        levels: list[int] | None = None,
    ) -> TypicalityModel:
        """Fit on healthy feature vectors ``features (N, L)`` (positive score norms).

        With ``reference_features`` the percentiles come from those held-out healthy inputs;
        without, from ``folds``-fold cross-fitting (each input scored by models fitted on the
        other folds), which uses small cohorts fully. ``levels``: read only these columns
        (noise-level indices) of every input (see the class attribute).
        """
        if levels is not None:
            typ = cls.fit(cls._columns(features, levels, "fit features"),
                          None if reference_features is None else
                          cls._columns(reference_features, levels, "reference features"),
                          models, folds, seed)
            typ.levels = [int(i) for i in levels]
            return typ
        features = _check_features(features, "fit features")
        logs = np.log(features)
        typ = cls(mean=logs.mean(0), scale=logs.std(0) + 1e-6)
        z = typ.transform(features)
        for name in models:
            typ.models[name] = _fit_model(name, z, seed)
        if reference_features is not None:
            z_ref = typ.transform(_check_features(reference_features, "reference features"))
            for name in models:
                typ.reference_scores[name] = np.sort(typ.models[name].score(z_ref))
        else:
            from sklearn.model_selection import KFold

            folds = max(2, min(folds, len(features) // 4))
            out_of_fold = {name: np.empty(len(features)) for name in models}
            for train, held in KFold(folds, shuffle=True, random_state=seed).split(features):
                sub = cls(mean=logs[train].mean(0), scale=logs[train].std(0) + 1e-6)
                z_train, z_held = sub.transform(features[train]), sub.transform(features[held])
                for name in models:
                    out_of_fold[name][held] = _fit_model(name, z_train, seed).score(z_held)
            typ.reference_scores = {k: np.sort(v) for k, v in out_of_fold.items()}
        return typ

    @staticmethod
    def _columns(features: np.ndarray, levels: list[int], what: str) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or not levels or min(levels) < 0 or (
                max(levels) >= features.shape[1]):
            raise ValueError(f"{what}: shape {features.shape} has no noise levels {levels}")
        return features[:, list(levels)]

    def select(self, features: np.ndarray) -> np.ndarray:
        """The columns of ``(N, L)`` feature vectors this model reads (all without
        ``levels``)."""
        if self.levels is None:
            return features
        return self._columns(features, self.levels, "features")

    def transform(self, features: np.ndarray) -> np.ndarray:
        return (np.log(np.maximum(features, 1e-12)) - self.mean) / self.scale

    def score(self, features: np.ndarray, model: str = "gmm") -> np.ndarray:
        """``(N, L)`` feature vectors -> ``(N,)`` anomaly scores (higher = more unusual);
        with ``levels`` only those columns are read."""
        if model not in self.models:
            raise KeyError(f"no auxiliary model '{model}' (have: {sorted(self.models)})")
        features = _check_features(self.select(features), "features", expected=len(self.mean))
        return self.models[model].score(self.transform(features))

    def percentile(self, scores: np.ndarray, model: str = "gmm") -> np.ndarray:
        """Percent of healthy reference scores below each score (ties count half)."""
        reference = self.reference_scores[model]
        below = np.searchsorted(reference, scores, side="left")
        at_or_below = np.searchsorted(reference, scores, side="right")
        return 100.0 * (below + at_or_below) / (2 * len(reference))

    def assess(self, features: np.ndarray, model: str = "gmm") -> list[Assessment]:
        scores = self.score(features, model)
        percentiles = self.percentile(scores, model)
        out = []
        for s, p in zip(scores, percentiles, strict=True):
            verdict = "typical"
            if p >= VERDICT_PERCENTILES["atypical"]:
                verdict = "atypical"
            elif p >= VERDICT_PERCENTILES["borderline"]:
                verdict = "borderline"
            out.append(Assessment(model, float(s), float(p), verdict,
                                  len(self.reference_scores[model])))
        return out

    def to_state(self) -> tuple[dict, dict]:
        """JSON-able config and a flat ``name -> tensor`` dict (for ``save_checkpoint``)."""
        config = {"models": {}}
        if self.levels is not None:
            config["levels"] = list(self.levels)
        tensors = {"mean": torch.as_tensor(self.mean), "scale": torch.as_tensor(self.scale)}
        for name, model in self.models.items():
            model_config, arrays = model.to_state()
            config["models"][name] = model_config
            for key, value in arrays.items():
                tensors[f"{name}.{key}"] = torch.as_tensor(np.asarray(value))
            tensors[f"{name}.reference_scores"] = torch.as_tensor(self.reference_scores[name])
        return config, tensors

    @classmethod
    def from_state(cls, config: dict, tensors: dict) -> TypicalityModel:
        arrays = {k: v.numpy() for k, v in tensors.items()}
        typ = cls(mean=arrays["mean"], scale=arrays["scale"], levels=config.get("levels"))
        for name, model_config in config["models"].items():
            prefix = f"{name}."
            own = {k[len(prefix):]: v for k, v in arrays.items()
                   if k.startswith(prefix) and k != f"{name}.reference_scores"}
            typ.models[name] = MODEL_CLASSES[name].from_state(model_config, own)
            typ.reference_scores[name] = arrays[f"{name}.reference_scores"]
        return typ


def _check_features(features: np.ndarray, what: str, expected: int | None = None) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{what}: expected an (N, L) array, got shape {features.shape}")
    if expected is not None and features.shape[1] != expected:
        raise ValueError(
            f"{what}: {features.shape[1]} noise levels, the typicality model expects {expected}"
        )
    if not np.isfinite(features).all() or (features <= 0).any():
        raise ValueError(f"{what}: score norms must be finite and positive")
    return features
