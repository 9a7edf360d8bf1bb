"""MSMA auxiliary models: exact likelihoods, distances, percentiles, safe round trip."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from SpatialMSMALib.metrics import detection_metrics
from SpatialMSMALib.typicality import (
    FlowDensity,
    GaussianMixtureDensity,
    KNearestNeighbourDistance,
    TypicalityModel,
)


def _two_clusters(n, rng):
    a = rng.normal([0, 0, 0], [1.0, 0.5, 0.2], size=(n // 2, 3))
    b = rng.normal([4, 1, -2], [0.3, 1.0, 0.5], size=(n - n // 2, 3))
    return np.r_[a, b]


def test_gmm_chooses_two_components_and_matches_sklearn_likelihood():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    x = _two_clusters(600, rng)
    gmm = GaussianMixtureDensity.fit(x, candidates=(1, 2, 3, 4))
    assert gmm.n_components in (2, 3)
    reference = GaussianMixture(gmm.n_components, covariance_type="full", reg_covar=1e-4,
                                random_state=0, n_init=2).fit(x)
    probe = rng.normal(size=(50, 3)) * 3
    np.testing.assert_allclose(gmm.log_likelihood(probe), reference.score_samples(probe),
                               rtol=1e-6, atol=1e-6)


def test_single_gaussian_likelihood_is_exact():
    rng = np.random.default_rng(1)
    cov = np.array([[2.0, 0.6], [0.6, 0.5]])
    x = rng.multivariate_normal([1.0, -1.0], cov, size=5000)
    gmm = GaussianMixtureDensity.fit(x, candidates=(1,))
    probe = rng.normal(size=(20, 2))
    # one component = the maximum-likelihood Gaussian (sample mean, biased covariance)
    mle = multivariate_normal(x.mean(0), np.cov(x, rowvar=False, bias=True) + 1e-4 * np.eye(2))
    np.testing.assert_allclose(gmm.log_likelihood(probe), mle.logpdf(probe), rtol=1e-6)


def test_knn_distance_matches_brute_force_and_leave_one_out():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(200, 4))
    knn = KNearestNeighbourDistance.fit(ref, k=5)
    probe = rng.normal(size=(30, 4))
    brute = np.sort(np.linalg.norm(probe[:, None] - ref[None], axis=2), axis=1)[:, 4]
    np.testing.assert_allclose(knn.score(probe), brute)
    self_dist = np.sort(np.linalg.norm(ref[:, None] - ref[None], axis=2), axis=1)[:, 5]
    np.testing.assert_allclose(knn.score(ref, exclude_self=True), self_dist)


def test_flow_learns_a_gaussian():
    rng = np.random.default_rng(3)
    cov = np.array([[1.0, 0.8], [0.8, 1.0]])
    x = rng.multivariate_normal([0, 0], cov, size=3000)
    flow = FlowDensity.fit(x, max_epochs=60, seed=0)
    probe = rng.multivariate_normal([0, 0], cov, size=500)
    truth_nll = -multivariate_normal([0, 0], cov).logpdf(probe).mean()
    assert abs(flow.score(probe).mean() - truth_nll) < 0.1
    # a point off the correlation axis is much less likely than one on it
    assert flow.score(np.array([[2.0, -2.0]]))[0] > flow.score(np.array([[2.0, 2.0]]))[0] + 5


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(4)
    healthy = np.exp(rng.normal([0, 1, 2, 3], 0.2, size=(300, 4)))
    reference = np.exp(rng.normal([0, 1, 2, 3], 0.2, size=(200, 4)))
    return TypicalityModel.fit(healthy, reference, seed=0), rng


def test_typicality_separates_shifted_inputs_and_reports_percentiles(fitted):
    typ, rng = fitted
    inliers = np.exp(rng.normal([0, 1, 2, 3], 0.2, size=(200, 4)))
    outliers = np.exp(rng.normal([0, 1, 2.8, 3], 0.2, size=(200, 4)))
    labels = np.r_[np.zeros(200), np.ones(200)]
    for name in ("gmm", "knn", "flow"):
        scores = np.r_[typ.score(inliers, name), typ.score(outliers, name)]
        assert detection_metrics(scores, labels)["auroc"] > 0.95, name
        # healthy inputs land uniformly on the reference percentiles: ~5% above the 95th
        above = (typ.percentile(typ.score(inliers, name), name) >= 95).mean()
        assert 0.0 <= above < 0.15, (name, above)
    verdicts = [a.verdict for a in typ.assess(np.exp(np.array([[0, 1, 2, 3], [0, 1, 5, 3.0]])))]
    assert verdicts == ["typical", "atypical"]


def test_percentile_counts_ties_half(fitted):
    typ, _ = fitted
    typ = TypicalityModel(typ.mean, typ.scale, typ.models,
                          {"gmm": np.array([1.0, 2.0, 2.0, 3.0])})
    np.testing.assert_allclose(typ.percentile(np.array([0.5, 2.0, 2.5, 9.0])), [0, 50, 75, 100])


def test_state_round_trip_gives_identical_scores(fitted, tmp_path):
    from SpatialMSMALib.checkpoint import load_checkpoint, save_checkpoint

    typ, rng = fitted
    config, tensors = typ.to_state()
    path = save_checkpoint(tmp_path / "typ.pt", "msma", config, {"typicality": tensors})
    loaded = load_checkpoint(path, kind="msma")
    again = TypicalityModel.from_state(loaded["config"], loaded["states"]["typicality"])
    probe = np.exp(rng.normal([0, 1, 2, 3], 0.5, size=(40, 4)))
    for name in typ.models:
        np.testing.assert_allclose(again.score(probe, name), typ.score(probe, name), rtol=1e-6)
        np.testing.assert_array_equal(again.reference_scores[name], typ.reference_scores[name])


def test_cross_fitted_reference_without_separate_set():
    rng = np.random.default_rng(5)
    healthy = np.exp(rng.normal(0, 0.3, size=(60, 5)))
    typ = TypicalityModel.fit(healthy, models=("gmm", "knn"))
    assert len(typ.reference_scores["gmm"]) == 60
    # out-of-fold scores are worse (higher) than in-sample ones
    assert np.median(typ.reference_scores["gmm"]) > np.median(typ.score(healthy, "gmm"))


def test_bad_features_are_refused(fitted):
    typ, _ = fitted
    with pytest.raises(ValueError, match="expects 4"):
        typ.score(np.ones((2, 3)))
    with pytest.raises(ValueError, match="finite and positive"):
        typ.score(np.array([[1.0, np.nan, 1.0, 1.0]]))
    with pytest.raises(KeyError, match="no auxiliary model"):
        typ.score(np.ones((1, 4)), "svm")


def test_detection_metrics_values():
    m = detection_metrics(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1]))
    assert m == {"auroc": 1.0, "auprc": 1.0, "fpr95": 0.0}
    m = detection_metrics(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 1, 1]))
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0


def test_a_level_subset_reads_only_its_columns_and_survives_the_round_trip(tmp_path):
    """``levels``: fitted on full ``(N, L)`` vectors, the model equals one fitted on those
    columns; the other columns are never read (NaN there is fine), and the choice is stored."""
    from SpatialMSMALib.checkpoint import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(6)
    healthy = np.exp(rng.normal([0, 1, 2, 3, 4], 0.2, size=(80, 5)))
    # held-out reference inputs (not cross-fitting: one GMM selection per fit, not six)
    reference = np.exp(rng.normal([0, 1, 2, 3, 4], 0.2, size=(40, 5)))
    reference_holes = reference.copy()
    reference_holes[:, [1, 3]] = np.nan
    subset = TypicalityModel.fit(healthy, reference_holes, models=("gmm", "knn"),
                                 levels=[0, 2, 4])
    columns = TypicalityModel.fit(healthy[:, [0, 2, 4]], reference[:, [0, 2, 4]],
                                  models=("gmm", "knn"))
    probe = np.exp(rng.normal([0, 1, 2, 3, 4], 0.4, size=(30, 5)))
    holes = probe.copy()
    holes[:, [1, 3]] = np.nan
    for name in ("gmm", "knn"):
        expected = columns.score(probe[:, [0, 2, 4]], name)
        np.testing.assert_allclose(subset.score(probe, name), expected, rtol=1e-12)
        np.testing.assert_allclose(subset.score(holes, name), expected, rtol=1e-12)
        np.testing.assert_array_equal(subset.reference_scores[name],
                                      columns.reference_scores[name])
    config, tensors = subset.to_state()
    path = save_checkpoint(tmp_path / "typ.pt", "msma", config, {"typicality": tensors})
    loaded = load_checkpoint(path, kind="msma")
    again = TypicalityModel.from_state(loaded["config"], loaded["states"]["typicality"])
    assert again.levels == [0, 2, 4]
    np.testing.assert_allclose(again.score(holes), subset.score(holes), rtol=1e-12)
    with pytest.raises(ValueError, match="no noise levels"):
        subset.score(probe[:, :3])  # level 4 is missing
