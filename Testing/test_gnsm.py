"""GNSM: ExpConcrete maths, table encoding, the PyOD-style detector, persistence and CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from SpatialMSMALib.cli import main as cli_main
from SpatialMSMALib.errors import InputError
from SpatialMSMALib.gnsm import GNSM, TabularEncoder, read_table
from SpatialMSMALib.gnsm.detector import _denoising_loss
from SpatialMSMALib.gnsm.noise import (
    GumbelNoiseSchedule,
    exp_concrete_log_density,
    exp_concrete_score,
    mixed_logits,
    sample_exp_concrete,
)

# ----------------------------------------------------------------------------- noise maths


def test_closed_form_score_matches_autograd_of_log_density():
    torch.manual_seed(0)
    for k in (2, 3, 7):
        alpha = torch.randn(16, k, dtype=torch.float64) * 3
        tau = torch.rand(16, 1, dtype=torch.float64) * 10 + 0.5
        y = sample_exp_concrete(alpha, tau).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(exp_concrete_log_density(y, alpha, tau).sum(), y)
        closed = exp_concrete_score(y.detach(), alpha, tau)
        assert torch.allclose(grad, closed, atol=1e-9, rtol=1e-7)
        # and it is not trivially zero
        assert closed.abs().max() > 0.1


def test_exp_concrete_density_is_normalised_and_matches_samples():
    """K = 2: y lives on {logsumexp(y) = 0}. Maddison et al.'s density is relative to the
    symmetric measure prod_k dx_k / x_k (x = exp y), i.e. exp(-y2) dy1: with that factor it
    integrates to one over y1 and its CDF matches the empirical CDF of samples."""
    alpha = torch.tensor([0.7, -0.4], dtype=torch.float64)
    tau = torch.tensor(0.8, dtype=torch.float64)

    def density(y1: float) -> float:
        y2 = math.log(-math.expm1(y1))
        y = torch.tensor([y1, y2], dtype=torch.float64)
        return math.exp(exp_concrete_log_density(y, alpha, tau).item() - y2)

    total, _ = integrate.quad(density, -60, -1e-12, limit=200)
    assert total == pytest.approx(1.0, abs=1e-4)
    torch.manual_seed(1)
    samples = sample_exp_concrete(alpha.expand(20000, 2), tau)[:, 0].numpy()
    for q in (-3.0, -1.0, -0.3):
        cdf, _ = integrate.quad(density, -60, q, limit=200)
        assert np.mean(samples <= q) == pytest.approx(cdf, abs=0.015)


def test_mixed_logits_are_normalised_probabilities():
    one_hot = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])  # (1, C=2, Kmax=4)
    slots = torch.tensor([3.0, 2.0])
    alpha = mixed_logits(one_hot, torch.tensor(0.3), slots)
    probs = torch.exp(alpha)
    assert torch.allclose(probs[0, 0, :3], torch.tensor([0.1, 0.8, 0.1]))
    assert torch.allclose(probs[0, 1, :2], torch.tensor([0.85, 0.15]))
    assert probs[0, 0, 3] == 0 and probs[0, 1, 2:].sum() == 0  # padding slots


def test_schedule_is_geometric_and_shared():
    s = GumbelNoiseSchedule(num_levels=5)
    taus, sigmas, mixes = s.taus, s.sigmas, s.mixes
    assert taus[0] == pytest.approx(20) and taus[-1] == pytest.approx(2)
    assert sigmas[0] == pytest.approx(1) and sigmas[-1] == pytest.approx(0.1)
    ratios = taus[1:] / taus[:-1]
    assert torch.allclose(ratios, ratios[0].expand(4))
    assert (mixes[1:] < mixes[:-1]).all()
    with pytest.raises(ValueError):
        GumbelNoiseSchedule(tau_min=30)


def test_denoising_loss_is_zero_for_the_exact_score_and_positive_otherwise():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    alpha = torch.randn(4, 2, 3).masked_fill(~mask, -80.0)
    tau = 1.7
    y = sample_exp_concrete(alpha, torch.tensor(tau)).masked_fill(~mask, 0.0)
    noise = torch.randn(4, 1)

    class Exact(torch.nn.Module):
        def forward(self, y_in, x_in, level):
            return alpha - tau * y_in, -noise  # logits of q, and sigma * score = -z

    class Wrong(torch.nn.Module):
        def forward(self, y_in, x_in, level):
            return torch.zeros_like(y_in), torch.zeros_like(noise)

    exact = _denoising_loss(Exact(), alpha, y, torch.zeros(4, 1), noise, tau, 0, mask)
    wrong = _denoising_loss(Wrong(), alpha, y, torch.zeros(4, 1), noise, tau, 0, mask)
    assert torch.allclose(exact, torch.zeros(4), atol=1e-5)
    assert (wrong > 1e-3).all()


# ----------------------------------------------------------------------------- tables


def test_encoder_types_unseen_missing_and_other_slot():
    train = pd.DataFrame({
        "colour": ["red", "blue", "red", None],
        "flag": [True, False, True, True],
        "size": [1.0, 2.0, 3.0, 4.0],
        "code": [1, 2, 1, 2],
    })
    enc = TabularEncoder.fit(train, categorical=["code"])
    assert [c.name for c in enc.categorical] == ["colour", "flag", "code"]
    assert [c.name for c in enc.numeric] == ["size"]
    colour = enc.categorical[0]
    assert colour.slots == ["blue", "red", "<missing>", "<other>"]
    test = pd.DataFrame({"colour": ["green", None, "blue"], "flag": [True, None, False],
                         "size": [2.5, np.nan, 10.0], "code": ["1", 2.0, 3]})
    codes, numeric = enc.transform(test)
    assert codes[:, 0].tolist() == [3, 2, 0]  # unseen -> <other>, missing -> <missing>
    # flag had no missing values in training: a missing one goes to <other>
    assert codes[1, 1] == enc.categorical[1].size - 1
    assert codes[:, 2].tolist() == [0, 1, 2]  # "1" and 2.0 match 1 and 2; 3 is unseen
    assert numeric[1, 0] == 0.0  # missing numeric -> training mean
    assert numeric[0, 0] == pytest.approx(0.0)
    assert numeric[2, 0] == pytest.approx((10 - 2.5) / np.std([1, 2, 3, 4]))


def test_encoder_bad_input_messages():
    with pytest.raises(InputError, match="empty"):
        TabularEncoder.fit(pd.DataFrame())
    with pytest.raises(InputError, match="only missing"):
        TabularEncoder.fit(pd.DataFrame({"a": ["x", "y"], "b": [None, None]}))
    with pytest.raises(InputError, match="'b' has a single category"):
        TabularEncoder.fit(pd.DataFrame({"a": ["x", "y"], "b": ["z", "z"]}))
    kept = TabularEncoder.fit(pd.DataFrame({"a": ["x", "y"], "b": ["z", "z"]}),
                              constant_columns="keep")
    assert kept.categorical[1].slots == ["z", "<other>"]
    dropped = TabularEncoder.fit(pd.DataFrame({"a": ["x", "y"], "b": ["z", "z"]}),
                                 constant_columns="drop")
    assert dropped.columns == ["a"] and dropped.dropped == ["b"]
    enc = TabularEncoder.fit(pd.DataFrame({"a": ["x", "y"], "n": [1.0, 2.0]}))
    with pytest.raises(InputError, match=r"lacks column\(s\).*'n'"):
        enc.transform(pd.DataFrame({"a": ["x"]}))
    with pytest.raises(InputError, match="has 3 columns"):
        enc.transform(np.array([["x", 1.0, 2.0]], dtype=object))
    with pytest.raises(InputError, match="non-numeric"):
        enc.transform(pd.DataFrame({"a": ["x"], "n": ["lots"]}))


def test_read_table_arff_and_csv(tmp_path):
    arff = tmp_path / "t.arff"
    arff.write_text("@relation t\n@attribute colour {red,blue,green}\n@attribute n numeric\n"
                    "@attribute class {0,1}\n@data\nred,1.5,0\nblue,?,1\n?,2,0\n")
    frame = read_table(arff)
    assert list(frame.columns) == ["colour", "n", "class"]
    assert isinstance(frame["colour"].dtype, pd.CategoricalDtype)
    assert frame["colour"].isna().tolist() == [False, False, True]
    assert np.isnan(frame["n"][1]) and frame["n"][2] == 2.0
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\nx,1\ny,?\n")
    assert read_table(csv)["b"].isna().tolist() == [False, True]
    with pytest.raises(InputError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown format"):
        read_table(tmp_path / "t.xlsx")


# ----------------------------------------------------------------------------- detector


def _rule_table(n: int, seed: int, anomalies: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Three categorical columns with c = (a + b) mod 5 plus a noise column and a numeric
    column tied to a; anomalies break the rule (each marginal stays uniform)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, n)
    b = rng.integers(0, 5, n)
    c = (a + b) % 5
    labels = np.zeros(n, int)
    if anomalies:
        labels[:anomalies] = 1
        c[:anomalies] = (c[:anomalies] + rng.integers(1, 5, anomalies)) % 5
    frame = pd.DataFrame({
        "a": [f"a{v}" for v in a], "b": [f"b{v}" for v in b], "c": [f"c{v}" for v in c],
        "noise": rng.choice(["p", "q", "r"], n),
        "x": a + rng.normal(0, 0.3, n),
    })
    return frame, labels


@pytest.fixture(scope="module")
def fitted():
    train, _ = _rule_table(3000, 0)
    return GNSM(steps=1500, random_state=0, contamination=0.05).fit(train)


def test_gnsm_finds_rows_that_break_the_joint_rule(fitted):
    test, labels = _rule_table(600, 1, anomalies=60)
    scores = fitted.decision_function(test)
    assert scores.shape == (600,)
    assert roc_auc_score(labels, scores) > 0.95


def test_pyod_contract(fitted):
    n = 3000
    assert fitted.decision_scores_.shape == (n,)
    assert fitted.labels_.mean() == pytest.approx(0.05, abs=0.01)
    assert fitted.threshold_ == pytest.approx(np.quantile(fitted.decision_scores_, 0.95))
    test, _ = _rule_table(200, 2, anomalies=20)
    scores = fitted.decision_function(test)
    assert (fitted.predict(test) == (scores > fitted.threshold_)).all()
    for method in ("linear", "unify"):
        proba = fitted.predict_proba(test, method=method)
        assert proba.shape == (200, 2)
        assert np.allclose(proba.sum(1), 1) and (proba >= 0).all() and (proba <= 1).all()
        # monotone in the score
        order = np.argsort(scores)
        assert (np.diff(proba[order, 1]) >= -1e-12).all()
    params = clone(fitted).get_params()
    assert params["steps"] == 1500 and params["contamination"] == 0.05
    with pytest.raises(RuntimeError, match="not fitted"):
        GNSM().decision_function(test)


def test_scores_do_not_depend_on_the_other_rows(fitted):
    test, _ = _rule_table(50, 3, anomalies=5)
    together = fitted.decision_function(test)
    alone = np.array([fitted.decision_function(test.iloc[[i]])[0] for i in (0, 7, 49)])
    assert np.allclose(together[[0, 7, 49]], alone, rtol=1e-5)


def test_unseen_category_scores_as_anomalous(fitted):
    test, _ = _rule_table(100, 4)
    base = fitted.decision_function(test)
    odd = test.copy()
    odd["noise"] = "never-seen"
    assert (fitted.decision_function(odd) > base).mean() > 0.95


def test_deterministic_given_random_state():
    train, _ = _rule_table(400, 5)
    test, _ = _rule_table(50, 6, anomalies=5)
    first = GNSM(steps=60, random_state=3).fit(train).decision_function(test)
    second = GNSM(steps=60, random_state=3).fit(train).decision_function(test)
    other = GNSM(steps=60, random_state=4).fit(train).decision_function(test)
    assert np.array_equal(first, second)
    assert not np.allclose(first, other)


def test_numpy_input_and_norms_readout():
    train, _ = _rule_table(800, 7)
    test, labels = _rule_table(300, 8, anomalies=30)
    array = train[["a", "b", "c"]].to_numpy()
    for aux in ("gmm", "knn"):
        det = GNSM(method="norms", aux_model=aux, steps=300, random_state=0).fit(array)
        scores = det.decision_function(test[["a", "b", "c"]].to_numpy())
        assert np.isfinite(scores).all() and scores.shape == (300,)
    assert det.aux_.name == "knn"


def test_save_load_roundtrip_and_safety(fitted, tmp_path):
    test, _ = _rule_table(100, 9, anomalies=10)
    path = fitted.save(tmp_path / "gnsm.pt")
    loaded = GNSM.load(path)
    assert np.allclose(loaded.decision_function(test), fitted.decision_function(test))
    assert loaded.threshold_ == pytest.approx(fitted.threshold_)
    with pytest.raises(FileExistsError):
        fitted.save(path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(blob))
    with pytest.raises(InputError):
        GNSM.load(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- CLI


def test_cli_fit_and_score(tmp_path, capsys):
    train, _ = _rule_table(1500, 10)
    test, labels = _rule_table(400, 11, anomalies=40)
    table = pd.concat([train.assign(label="ok"),
                       test.assign(label=np.where(labels == 1, "bad", "ok"))])
    csv = tmp_path / "rows.csv"
    table.to_csv(csv, index=False)
    model = tmp_path / "model.pt"
    # anomalies in the table are left out of the fit
    assert cli_main(["gnsm", "fit", str(csv), "--out", str(model), "--label-column", "label",
                     "--anomaly-value", "bad", "--steps", "400"]) == 0
    out = capsys.readouterr().out
    assert "fitted on 1860 rows (40 anomalous rows left out)" in out
    scores_csv = tmp_path / "scores.csv"
    assert cli_main(["gnsm", "score", str(model), str(csv), "--out", str(scores_csv)]) == 0
    out = capsys.readouterr().out
    scored = pd.read_csv(scores_csv)
    assert len(scored) == 1900 and list(scored.columns[:4]) == [
        "row", "score", "outlier", "outlier_probability"]
    assert roc_auc_score(scored["label"], scored["score"]) > 0.9
    assert "AUROC" in out
    # refuses to overwrite; clear error for a table with the wrong columns
    assert cli_main(["gnsm", "score", str(model), str(csv), "--out", str(scores_csv)]) == 2
    assert "already exists" in capsys.readouterr().err
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"a": ["a1"], "zzz": ["q"]}).to_csv(wrong, index=False)
    assert cli_main(["gnsm", "score", str(model), str(wrong), "--out",
                     str(tmp_path / "w.csv")]) == 2
    err = capsys.readouterr().err
    assert "wrong.csv" in err and "lacks column" in err


def test_tabulated_scoring_equals_the_direct_loss(fitted):
    """level_losses tabulates the shared noise per column value; it must equal the training
    loss evaluated row by row with the same noise."""
    test, _ = _rule_table(40, 12, anomalies=4)
    fast = fitted.level_losses(test)
    codes, numeric = fitted.encoder_.transform(test)
    c, x = torch.as_tensor(codes), torch.as_tensor(numeric)
    mask = fitted._slot_mask("cpu")
    bank = fitted.noise_bank_
    direct = np.zeros_like(fast)
    with torch.no_grad():
        for level in range(fitted.num_levels):
            tau = float(fitted.schedule_.taus[level])
            sigma = float(fitted.schedule_.sigmas[level])
            alpha = fitted._alpha(c, mask, fitted.schedule_.mixes[level])
            for d in range(bank["gumbel"].shape[1]):
                noisy = ((alpha + bank["gumbel"][level, d]) / tau).masked_fill(~mask, -math.inf)
                y = torch.log_softmax(noisy, -1).masked_fill(~mask, 0.0)
                z = bank["normal"][level, d].expand_as(x)
                loss = _denoising_loss(fitted.network_, alpha, y, x + sigma * z, z, tau, level,
                                       mask)
                direct[:, level] += loss.numpy() / bank["gumbel"].shape[1]
    assert np.allclose(fast, direct, rtol=1e-4, atol=1e-5)
    assert fast.min() > 0


# ----------------------------------------------------------------------------- benchmark harness


def _benchmark_module():
    from conftest import load_benchmark_script

    return load_benchmark_script("gnsm_tabular")


def test_benchmark_ranks_and_wins():
    bench = _benchmark_module()
    rows = []
    for d, values in {"d1": {"GNSM": 0.9, "IForest": 0.8, "ECOD": 0.7},
                      "d2": {"GNSM": 0.6, "IForest": 0.6, "ECOD": 0.9}}.items():
        for m, v in values.items():
            for seed, jitter in ((0, -0.01), (1, 0.01)):
                rows.append({"dataset": d, "method": m, "seed": seed, "auroc": v + jitter,
                             "auprc": v / 2 + jitter, "fit_s": 1.0, "score_s": 0.1})
    summary = bench.summarise(rows, ["d1", "d2"], ["GNSM", "IForest", "ECOD"])
    assert summary["table"][("d1", "GNSM")]["auroc"] == pytest.approx((0.9, 0.01))
    # d1: GNSM 1, IForest 2, ECOD 3; d2: ECOD 1, GNSM and IForest tie at 2.5
    assert summary["ranks"]["auroc"] == {"GNSM": 1.75, "IForest": 2.25, "ECOD": 2.0}
    assert summary["gnsm_beats_iforest"] == {"auroc": 1, "auprc": 1}


def test_benchmark_runs_a_pyod_baseline_on_one_hot_inputs():
    bench = _benchmark_module()
    train, _ = _rule_table(500, 13)
    test, labels = _rule_table(200, 14, anomalies=20)
    test.loc[:19, "noise"] = "unseen"  # goes to the one-hot "<other>" column
    out = bench.run_one("ECOD", train, test, seed=0, gnsm_steps=10, gnsm={})
    assert out["scores"].shape == (200,)
    assert roc_auc_score(labels, out["scores"]) > 0.9  # ECOD sees the never-set column


def test_avf_baseline_scores_rare_values_higher():
    bench = _benchmark_module()
    train = pd.DataFrame({"a": ["x"] * 90 + ["y"] * 10, "b": ["p", "q"] * 50})
    test = pd.DataFrame({"a": ["x", "y", "z"], "b": ["p", "p", "p"]})
    out = bench.run_one("AVF", train, test, seed=0, gnsm_steps=1, gnsm={})
    # mean frequencies: (0.9 + 0.5) / 2, (0.1 + 0.5) / 2, (0 + 0.5) / 2
    assert np.allclose(out["scores"], [-0.7, -0.3, -0.25])


def test_the_command_line_does_not_load_scikit_learn_or_pandas_for_other_commands():
    """The ``gnsm`` sub-commands are registered on every CLI call; the package's names are
    imported on first use, so building the parser (what ``detect`` and ``demo`` pay for)
    loads neither scikit-learn nor pandas, while the names still import as before."""
    import subprocess
    import sys

    probe = ("import sys; from SpatialMSMALib.cli import build_parser; build_parser(); "
             "print(sorted({'sklearn', 'pandas'} & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
    import SpatialMSMALib.gnsm as gnsm_package

    assert gnsm_package.GNSM is GNSM and gnsm_package.read_table is read_table
    with pytest.raises(AttributeError, match="no attribute 'absent'"):
        gnsm_package.absent  # noqa: B018
