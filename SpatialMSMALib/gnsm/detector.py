"""GNSM: Gumbel Noise Score Matching anomaly detector for categorical and mixed tables.

PyOD / scikit-learn contract::

    detector = GNSM(random_state=0).fit(train_frame)       # inliers (or mostly inliers)
    scores = detector.decision_function(test_frame)        # (N,), higher = more anomalous
    labels = detector.predict(test_frame)                  # 1 = outlier (score > threshold_)
    proba = detector.predict_proba(test_frame)             # (N, 2): [inlier, outlier]

Fitted attributes: ``encoder_`` (column layout), ``network_`` (score network),
``decision_scores_`` (training rows' scores), ``threshold_`` (their
``1 - contamination`` quantile), ``labels_``.

Training: each row is noised at ``L`` levels (ExpConcrete temperatures with category mixing
for categorical columns, Gaussian sigmas for numeric ones, one shared index; see
:mod:`.noise`); a residual MLP learns the noise-scaled score by denoising score matching.

Two read-outs (``method``):

- ``"denoising"`` (default): the row's expected denoising score-matching loss at each level
  (KL between the noisy sample's score target and the network's, plus the Gaussian term for
  numeric columns), averaged over ``scoring_draws`` fixed noise draws and summed over levels.
  Summed over levels, the denoising loss is a variational bound on the row's negative
  log-likelihood up to a constant (as for diffusion models), so a row the model cannot denoise
  is an unlikely row. The noise draws are fixed at fit time and shared by all rows, so a row's
  score does not depend on the other rows in the call.
- ``"norms"``: the published MSMA read-out: the L2 norm of the noise-scaled score of the clean
  row at each level, an ``L``-vector whose log is standardised and scored by an auxiliary
  model (``aux_model``): a full-covariance Gaussian mixture (components by cross-validated
  likelihood; score = negative log-likelihood) or the k-th nearest-neighbour distance.

On the categorical suite (``benchmarks/gnsm_tabular.py``) the denoising read-out ranks
anomalies far better than the norms: the norm of the score at the clean point is a weak,
indirect summary, while the loss measures directly how surprising each value is given the
others.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import InputError
from ..training_utils import warmup_cosine
from ..typicality import GaussianMixtureDensity, KNearestNeighbourDistance
from .network import TabularScoreNetwork
from .noise import GumbelNoiseSchedule, mixed_logits
from .table import TabularEncoder

CHECKPOINT_KIND = "gnsm"
METHODS = ("denoising", "norms")
AUX_MODELS = ("gmm", "knn")
#: the Gaussian mixture is fitted on at most this many training rows, its number of
#: components chosen on at most AUX_SELECTION_ROWS (a 20-dim GMM needs far fewer rows than a
#: large table has; this bounds the fit time)
AUX_FIT_ROWS = 10000
AUX_SELECTION_ROWS = 3000
#: padding logit for slots a column does not have: finite (no inf - inf) and small enough
#: that exp() underflows to a normal float32, not a (slow) denormal
_PAD = -80.0


class GNSM(BaseEstimator):
    """Gumbel Noise Score Matching outlier detector (see the module docstring).

    Args:
        contamination: expected outlier fraction of the training rows, sets ``threshold_``.
        num_levels, tau_max, tau_min, sigma_max, sigma_min, mix_max, mix_min: the noise
            schedule (:class:`.noise.GumbelNoiseSchedule`; ``mix`` is the weight of the
            uniform distribution mixed into the one-hot logits at each level).
        width, blocks: residual MLP size.
        steps, batch_size, learning_rate: score-matching training (AdamW, warm-up + cosine).
        method: "denoising" (default) or "norms" (see the module docstring).
        scoring_draws: noise draws per level for the denoising read-out.
        aux_model: for ``method="norms"``: "gmm" (default) or "knn" (``knn_k`` neighbours).
        gmm_components: candidate numbers of mixture components (chosen by 3-fold CV).
        categorical_columns, numeric_columns: force column types (names or array indices).
        constant_columns: single-valued training columns: "error" (default), "keep" (other
            values at scoring time look anomalous) or "drop".
        device: "cpu", "cuda" or "auto".
        random_state: seed for initialisation, batches and noise (deterministic when set).
        verbose: print training progress.
    """

    def __init__(
        self,
        contamination: float = 0.1,
        num_levels: int = 20,
        tau_max: float = 20.0,
        tau_min: float = 2.0,
        sigma_max: float = 1.0,
        sigma_min: float = 0.1,
        mix_max: float = 0.5,
        mix_min: float = 1e-3,
        width: int = 128,
        blocks: int = 3,
        steps: int = 1000,
        batch_size: int = 512,
        learning_rate: float = 2e-3,
        method: str = "denoising",
        scoring_draws: int = 1,
        aux_model: str = "gmm",
        knn_k: int = 5,
        gmm_components: tuple = (1, 2, 4, 8),
        categorical_columns: list | None = None,
        numeric_columns: list | None = None,
        constant_columns: str = "error",
        device: str = "cpu",
        random_state: int | None = None,
        verbose: bool = False,
    ):
        self.contamination = contamination
        self.num_levels = num_levels
        self.tau_max = tau_max
        self.tau_min = tau_min
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.mix_max = mix_max
        self.mix_min = mix_min
        self.width = width
        self.blocks = blocks
        self.steps = steps
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.method = method
        self.scoring_draws = scoring_draws
        self.aux_model = aux_model
        self.knn_k = knn_k
        self.gmm_components = gmm_components
        self.categorical_columns = categorical_columns
        self.numeric_columns = numeric_columns
        self.constant_columns = constant_columns
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> GNSM:
        """Fit on the rows of ``X`` (DataFrame or 2-D array). ``y`` is ignored (PyOD API)."""
        self._check_params()
        seed = (int(self.random_state) if self.random_state is not None
                else int(np.random.SeedSequence().generate_state(1)[0]))
        self.encoder_ = TabularEncoder.fit(
            X, self.categorical_columns, self.numeric_columns, self.constant_columns
        )
        codes, numeric = self.encoder_.transform(X, "training table")
        self.schedule_ = self._schedule()
        device = self._device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network_ = self._build_network().to(device)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        self.loss_history_ = self._train(codes, numeric, generator, device)
        self.fit_seconds_ = time.perf_counter() - start
        self.noise_bank_ = self._draw_noise_bank(seed)
        if self.method == "denoising":
            self.aux_ = None
            self.decision_scores_ = self.level_losses(X, _encoded=(codes, numeric)).sum(1)
        else:
            features = self.score_norms(X, _encoded=(codes, numeric))
            logs = np.log(np.maximum(features, 1e-12))
            self.feature_mean_ = logs.mean(0)
            self.feature_scale_ = logs.std(0) + 1e-6
            z = self._standardise(features)
            if self.aux_model == "gmm":
                self.aux_ = GaussianMixtureDensity.fit(
                    z[_subsample(len(z), AUX_FIT_ROWS, seed)],
                    candidates=tuple(self.gmm_components), folds=3, seed=seed % (2**31),
                    selection_rows=AUX_SELECTION_ROWS, n_init=1,
                )
                self.decision_scores_ = self.aux_.score(z)
            else:
                self.aux_ = KNearestNeighbourDistance.fit(z, k=self.knn_k)
                self.decision_scores_ = self.aux_.score(z, exclude_self=True)
        self._set_threshold()
        return self

    def _draw_noise_bank(self, seed: int) -> dict[str, torch.Tensor]:
        """Fixed scoring noise, shared by all rows: Gumbel ``(L, D, C, Kmax)`` and standard
        normal ``(L, D, M)`` for ``D = scoring_draws``."""
        generator = torch.Generator().manual_seed(seed + 1)
        levels, draws = self.num_levels, self.scoring_draws
        slots = max(self.encoder_.slot_counts, default=1)
        uniform = torch.rand((levels, draws, len(self.encoder_.categorical), slots),
                             generator=generator).clamp_(1e-10, 1 - 1e-7)
        return {
            "gumbel": -torch.log(-torch.log(uniform)),
            "normal": torch.randn((levels, draws, len(self.encoder_.numeric)),
                                  generator=generator),
        }

    def _check_params(self) -> None:
        if not 0 < self.contamination <= 0.5:
            raise ValueError(f"contamination must be in (0, 0.5], got {self.contamination}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got '{self.method}'")
        if self.scoring_draws < 1:
            raise ValueError("scoring_draws must be at least 1")
        if self.aux_model not in AUX_MODELS:
            raise ValueError(f"aux_model must be one of {AUX_MODELS}, got '{self.aux_model}'")
        if self.constant_columns not in ("error", "keep", "drop"):
            raise ValueError("constant_columns must be 'error', 'keep' or 'drop'")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")

    def _schedule(self) -> GumbelNoiseSchedule:
        return GumbelNoiseSchedule(self.tau_max, self.tau_min, self.sigma_max, self.sigma_min,
                                   self.num_levels, self.mix_max, self.mix_min)

    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def _build_network(self) -> TabularScoreNetwork:
        return TabularScoreNetwork(
            num_categorical=len(self.encoder_.categorical),
            max_slots=max(self.encoder_.slot_counts, default=1),
            num_numeric=len(self.encoder_.numeric),
            num_levels=self.num_levels, width=self.width, blocks=self.blocks,
        )

    def _slot_mask(self, device) -> torch.Tensor:
        """``(C, Kmax)`` bool, True for slots a column has."""
        counts = torch.tensor(self.encoder_.slot_counts or [1], device=device)
        max_slots = max(self.encoder_.slot_counts, default=1)
        mask = torch.arange(max_slots, device=device)[None] < counts[:, None]
        return mask[: len(self.encoder_.categorical)]

    def _alpha(self, codes: torch.Tensor, mask: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """Mixed one-hot logits ``(B, C, Kmax)`` (``mix`` ``(B, 1, 1)``); padding at ``_PAD``."""
        one_hot = torch.nn.functional.one_hot(codes, mask.shape[1]).float()
        alpha = mixed_logits(one_hot, mix, mask.sum(1).to(one_hot.dtype))
        return alpha.masked_fill(~mask, _PAD)

    def _train(self, codes: np.ndarray, numeric: np.ndarray, generator, device) -> list[float]:
        network = self.network_
        network.train()
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.learning_rate,
                                      weight_decay=1e-5)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, min(200, self.steps // 10 + 1), self.steps,
                                               0.02))
        codes_t = torch.as_tensor(codes)
        numeric_t = torch.as_tensor(numeric)
        mask = self._slot_mask("cpu")
        taus, sigmas = self.schedule_.taus, self.schedule_.sigmas
        mixes = self.schedule_.mixes
        n = len(codes_t)
        batch = min(self.batch_size, n)
        history, running = [], []
        progress = _progress(self.steps, self.verbose)
        for step in range(self.steps):
            index = torch.randint(0, n, (batch,), generator=generator)
            level = torch.randint(0, self.num_levels, (batch,), generator=generator)
            tau = taus[level].view(-1, 1, 1)
            alpha = self._alpha(codes_t[index], mask, mixes[level].view(-1, 1, 1))
            # ExpConcrete sample over each column's own slots (padding slots masked: at high
            # temperature their finite padding logit would otherwise take probability mass)
            uniform = torch.rand(alpha.shape, generator=generator).clamp_(1e-10, 1 - 1e-7)
            y = _log_softmax((alpha - torch.log(-torch.log(uniform))) / tau, mask)
            y = y.masked_fill(~mask, 0.0)
            noise = torch.randn(numeric_t[index].shape, generator=generator)
            x = numeric_t[index] + sigmas[level].view(-1, 1) * noise
            loss = _denoising_loss(network, alpha.to(device), y.to(device), x.to(device),
                                   noise.to(device), tau.to(device), level.to(device),
                                   mask.to(device)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running.append(loss.item())
            if len(running) == 50 or step == self.steps - 1:
                history.append(float(np.mean(running)))
                running = []
                if progress is not None:
                    progress.set_postfix(loss=f"{history[-1]:.4f}")
            if progress is not None:
                progress.update()
        if progress is not None:
            progress.close()
        network.eval()
        return history

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_norms(self, X, batch_rows: int = 8192, _encoded=None) -> np.ndarray:
        """``(N, L)`` noise-scaled score norms of the clean rows at every level (level 0 =
        most noise): categorical part ``||K q - 1||`` per column with ``q = softmax(logits)``,
        numeric part ``||sigma * score||``, combined by L2 over all columns."""
        self._check_fitted()
        codes, numeric = _encoded if _encoded is not None else self.encoder_.transform(X)
        device = self._device()
        network = self.network_.to(device).eval()
        mask = self._slot_mask(device)
        counts = mask.sum(1).to(torch.float32)
        clean_hot, clean_off = self._clean_logprobs(mask, device)
        out = np.empty((len(codes), self.num_levels), np.float64)
        for start in range(0, len(codes), batch_rows):
            c = torch.as_tensor(codes[start:start + batch_rows], device=device)
            x = torch.as_tensor(numeric[start:start + batch_rows], device=device)
            hot = torch.nn.functional.one_hot(c, mask.shape[1]).bool()  # (b, C, K)
            for level in range(self.num_levels):
                y = torch.where(hot, clean_hot[level], clean_off[level])
                logits, scaled_score = network(y, x, level)
                # ||K q - 1||^2 over a column's slots = K^2 sum(q^2) - K (since sum(q) = 1),
                # with q = softmax(logits) over the column's own slots (written out: torch's
                # softmax is slow along a dimension this short)
                shifted = logits.masked_fill(~mask, _PAD)
                e = torch.exp((shifted - shifted.amax(-1, keepdim=True)).clamp_min(_PAD))
                sum_q2 = e.pow(2).sum(-1) / e.sum(-1).pow(2)
                cat = (counts.pow(2) * sum_q2 - counts).sum(1)
                norm = torch.sqrt(cat.clamp_min(0) + scaled_score.pow(2).sum(1))
                out[start:start + len(c), level] = norm.double().cpu().numpy()
        return np.maximum(out, 1e-12)

    def _clean_logprobs(self, mask, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise-free points ``log_softmax(alpha / tau)`` at every level: the value at the
        hot slot and at the other slots of each column, ``(L, C, Kmax)`` each (padding 0)."""
        taus = self.schedule_.taus.to(device).view(-1, 1)
        mixes = self.schedule_.mixes.to(device).view(-1, 1)
        counts = mask.sum(1).to(torch.float32).view(1, -1)
        hot = torch.log(1 - mixes + mixes / counts) / taus  # (L, C)
        off = torch.log(mixes / counts) / taus
        lse = torch.logaddexp(hot, off + torch.log(counts - 1))
        shape = (len(taus), *mask.shape)
        return ((hot - lse)[..., None].expand(shape).masked_fill(~mask, 0.0),
                (off - lse)[..., None].expand(shape).masked_fill(~mask, 0.0))

    @torch.no_grad()
    def level_losses(self, X, batch_rows: int = 8192, _encoded=None) -> np.ndarray:
        """``(N, L)`` expected denoising loss of each row at each level (nats + half squared
        error), averaged over the fixed noise draws (``noise_bank_``)."""
        self._check_fitted()
        codes, numeric = _encoded if _encoded is not None else self.encoder_.transform(X)
        device = self._device()
        network = self.network_.to(device).eval()
        mask = self._slot_mask(device)
        taus = self.schedule_.taus.tolist()
        sigmas = self.schedule_.sigmas.tolist()
        mixes = self.schedule_.mixes.tolist()
        gumbel = self.noise_bank_["gumbel"].to(device)
        normal = self.noise_bank_["normal"].to(device)
        draws = gumbel.shape[1]
        columns = torch.arange(mask.shape[0], device=device)
        # every possible value of every column, as a batch of "rows": row h has slot h in each
        # column (slots a column lacks are never looked up)
        all_values = torch.arange(mask.shape[1], device=device)[:, None].expand(-1, len(columns))
        out = np.zeros((len(codes), self.num_levels), np.float64)
        for level in range(self.num_levels):
            # The noise is shared by all rows, so the noisy input y, the target q and its
            # negative entropy depend only on each column's value: tabulate them once.
            alpha = self._alpha(all_values, mask, torch.tensor(mixes[level], device=device))
            tables = []
            for d in range(draws):
                y = _log_softmax((alpha + gumbel[level, d]) / taus[level], mask)
                y = y.masked_fill(~mask, 0.0)  # (Kmax, C, Kmax)
                target_log = _log_softmax(alpha - taus[level] * y, mask)
                q = torch.exp(target_log) * mask
                tables.append((y, q, (q * target_log).sum(-1)))  # .., (Kmax, C)
            for start in range(0, len(codes), batch_rows):
                c = torch.as_tensor(codes[start:start + batch_rows], device=device)
                x = torch.as_tensor(numeric[start:start + batch_rows], device=device)
                total = torch.zeros(len(c), device=device)
                for d, (y_table, q_table, negentropy) in enumerate(tables):
                    z = normal[level, d]
                    logits, scaled_score = network(y_table[c, columns], x + sigmas[level] * z,
                                                   level)
                    # KL(q || p) = sum q log q - sum q log p
                    cross = (q_table[c, columns] * _log_softmax(logits, mask)).sum((1, 2))
                    total += negentropy[c, columns].sum(1) - cross
                    total += 0.5 * (scaled_score + z).pow(2).sum(1)
                out[start:start + len(c), level] = (total / draws).double().cpu().numpy()
        return out

    def _standardise(self, features: np.ndarray) -> np.ndarray:
        return (np.log(np.maximum(features, 1e-12)) - self.feature_mean_) / self.feature_scale_

    def decision_function(self, X) -> np.ndarray:
        """Anomaly score per row ``(N,)``, higher = more anomalous (GMM: negative
        log-likelihood of the standardised log score norms, nats; k-NN: distance)."""
        if self.method == "denoising":
            return self.level_losses(X).sum(1)
        return self.aux_.score(self._standardise(self.score_norms(X)))

    def _set_threshold(self) -> None:
        self.threshold_ = float(np.quantile(self.decision_scores_, 1 - self.contamination))
        self.labels_ = (self.decision_scores_ > self.threshold_).astype(int)
        self._mu = float(np.mean(self.decision_scores_))
        self._sigma = float(np.std(self.decision_scores_)) or 1.0

    def predict(self, X) -> np.ndarray:
        """``(N,)`` int: 1 for rows scoring above ``threshold_``, else 0."""
        return (self.decision_function(X) > self.threshold_).astype(int)

    def predict_proba(self, X, method: str = "linear") -> np.ndarray:
        """``(N, 2)`` [inlier, outlier] probabilities from the score, as PyOD does: "linear"
        min-max scales with the training scores; "unify" uses the Gaussian CDF of the score
        standardised with the training scores (Kriegel et al., 2011)."""
        outlier = self.outlier_probability(self.decision_function(X), method)
        return np.column_stack([1 - outlier, outlier])

    def outlier_probability(self, scores: np.ndarray, method: str = "linear") -> np.ndarray:
        """``(N,)`` outlier probability of already computed scores (see ``predict_proba``)."""
        if method == "linear":
            low, high = float(self.decision_scores_.min()), float(self.decision_scores_.max())
            outlier = np.clip((scores - low) / max(high - low, 1e-12), 0, 1)
        elif method == "unify":
            from scipy.special import erf

            outlier = np.clip(erf((scores - self._mu) / (self._sigma * math.sqrt(2))), 0, 1)
        else:
            raise ValueError(f"method must be 'linear' or 'unify', got '{method}'")
        return outlier

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).labels_

    def _check_fitted(self) -> None:
        if not hasattr(self, "network_"):
            raise RuntimeError("this GNSM is not fitted yet; call fit() first")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, overwrite: bool = False,
             metadata: dict | None = None) -> Path:
        """Write the fitted detector as a safe checkpoint (config, version, checksum);
        refuses to replace an existing file unless ``overwrite``. ``metadata``: plain JSON data
        kept with the model (``metadata_`` after loading), e.g. the label column."""
        self._check_fitted()
        params = self.get_params()
        params["gmm_components"] = list(params["gmm_components"])
        config = {"params": params, "encoder": self.encoder_.to_state(),
                  "threshold": self.threshold_}
        states = {
            "network": self.network_.state_dict(),
            "noise_bank": dict(self.noise_bank_),
            "fit": {"decision_scores": torch.as_tensor(self.decision_scores_)},
        }
        if self.aux_ is not None:
            aux_config, aux_arrays = self.aux_.to_state()
            config["aux"] = {"name": self.aux_.name, "config": aux_config}
            states["aux"] = {k: torch.as_tensor(np.asarray(v)) for k, v in aux_arrays.items()}
            states["fit"]["feature_mean"] = torch.as_tensor(self.feature_mean_)
            states["fit"]["feature_scale"] = torch.as_tensor(self.feature_scale_)
        return save_checkpoint(path, CHECKPOINT_KIND, config, states,
                               extra={"loss_history": self.loss_history_,
                                      "metadata": metadata or {}},
                               overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> GNSM:
        """Load a detector written by :meth:`save` (no code is executed)."""
        payload = load_checkpoint(path, CHECKPOINT_KIND)
        config, states = payload["config"], payload["states"]
        params = dict(config["params"])
        params["gmm_components"] = tuple(params["gmm_components"])
        detector = cls(**params)
        detector.encoder_ = TabularEncoder.from_state(config["encoder"])
        detector.schedule_ = detector._schedule()
        detector.network_ = detector._build_network()
        detector.network_.load_state_dict(states["network"])
        detector.network_.eval()
        detector.noise_bank_ = dict(states["noise_bank"])
        fit = states["fit"]
        detector.decision_scores_ = fit["decision_scores"].numpy()
        detector.aux_ = None
        if "aux" in config:
            arrays = {k: v.numpy() for k, v in states["aux"].items()}
            aux_class = {"gmm": GaussianMixtureDensity, "knn": KNearestNeighbourDistance}
            name = config["aux"]["name"]
            if name not in aux_class:
                raise InputError(f"GNSM model '{path}': unknown auxiliary model '{name}'")
            detector.aux_ = aux_class[name].from_state(config["aux"]["config"], arrays)
            detector.feature_mean_ = fit["feature_mean"].numpy()
            detector.feature_scale_ = fit["feature_scale"].numpy()
        detector.loss_history_ = payload["extra"].get("loss_history", [])
        detector.metadata_ = payload["extra"].get("metadata", {})
        detector._set_threshold()
        return detector


def _denoising_loss(network, alpha, y, x, noise, tau, level, mask) -> torch.Tensor:
    """Per-row denoising score-matching loss ``(B,)``: for categorical columns
    ``KL(q || softmax(logits))`` with the noisy sample's score target ``q = softmax(alpha -
    tau y)`` (the score is ``tau (K q - 1)``); for numeric columns ``0.5 ||sigma s + z||^2``.
    ``alpha, y``: ``(B, C, Kmax)``; ``x, noise``: ``(B, M)``; ``tau``: float or
    ``(B, 1, 1)``; ``level``: int or ``(B,)``."""
    target_log = _log_softmax(alpha - tau * y, mask)
    logits, scaled_score = network(y, x, level)
    kl = torch.exp(target_log) * (target_log - _log_softmax(logits, mask))
    return (kl * mask).sum((1, 2)) + 0.5 * (scaled_score + noise).pow(2).sum(1)


def _log_softmax(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last (short) dimension restricted to ``mask``; written out because
    torch's kernel is slow along a dimension of a few slots. Padding slots get ``_PAD``."""
    values = values.masked_fill(~mask, _PAD)
    shifted = values - values.amax(-1, keepdim=True)
    # clamped inside exp only: exp(-80) is already negligible and avoids denormals
    return shifted - torch.log(torch.exp(shifted.clamp_min(_PAD)).sum(-1, keepdim=True))


def _subsample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _progress(total: int, verbose: bool):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="GNSM score matching", unit="step", mininterval=2.0)
