"""Heads for tasks beyond one label an image: tags (multi-label) and numbers (regression), on generated data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge, RidgeCV

from headstart.export.errors import UsageError
from headstart.heads.regression import RidgeHead, regression_metrics
from headstart.heads.tags import TagHead, best_thresholds, f1_scores, tag_metrics


def tagged(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose three tags are linear rules of their features, one of them rare (about 10%)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 30)).astype(np.float32) + 3  # off the origin, as ReLU features are
    Y = np.stack([X[:, 0] > 3, X[:, 1] - X[:, 2] > 0.5, X[:, 3] + 0.5 * X[:, 4] > 5.9], axis=1)
    return X, Y


def test_tag_head_learns_each_tag_and_its_threshold():
    X, Y = tagged(600, 0)
    X_test, Y_test = tagged(400, 1)
    assert 0.05 < Y[:, 2].mean() < 0.2
    head = TagHead().fit(X, Y, tags=["a", "b", "rare"])
    proba = head.predict_proba(X_test)
    scores = tag_metrics(Y_test, proba, head.predict(X_test), list(head.tags_))
    assert scores["mAP"] > 0.9 and scores["micro_f1"] > 0.85, scores
    # features that say nothing of the tags cannot reach that: the same head on shuffled rows
    shuffled = TagHead().fit(X, Y[np.random.default_rng(2).permutation(len(Y))])
    assert tag_metrics(Y_test, shuffled.predict_proba(X_test), shuffled.predict(X_test), ["a", "b", "r"])["mAP"] < 0.6
    assert head.l2_ in {r["l2"] for r in head.cv_results_}
    assert head.thresholds_.shape == (3,) and 0 < head.thresholds_.min() and head.thresholds_.max() < 1


def test_thresholds_maximize_f1_on_the_given_rows():
    Y = np.array([[1], [1], [0], [1], [0], [0]])
    proba = np.array([[0.9], [0.4], [0.35], [0.3], [0.2], [0.1]])
    t = best_thresholds(Y, proba)
    assert 0.2 < t[0] <= 0.3  # the cut below 0.3 keeps all three tagged rows: F1 = 6 / 7
    micro, per_tag = f1_scores(Y.astype(bool), proba >= t)
    assert per_tag[0] == pytest.approx(6 / 7) and micro == pytest.approx(6 / 7)


def test_tag_head_refuses_a_tag_matrix_that_does_not_fit():
    X, Y = tagged(50, 0)
    with pytest.raises(UsageError, match="0/1 for 50 rows"):
        TagHead().fit(X, Y[:40])
    with pytest.raises(UsageError, match="0/1"):
        TagHead().fit(X, Y * 2.5)


@pytest.mark.parametrize("n,d", [(200, 40), (60, 300)])  # more rows than features, and fewer (a pool5 cache)
def test_ridge_head_matches_scikit_learn_on_standardized_features(n, d):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 5, d) + 2
    y = X[:, :5] @ rng.normal(size=5) + rng.normal(scale=0.5, size=n)
    alphas = (0.1, 1.0, 10.0, 100.0)
    head = RidgeHead(alphas=alphas).fit(X, y)
    Xs = (X - X.mean(0)) / X.std(0)
    reference = RidgeCV(alphas=alphas, gcv_mode="svd").fit(Xs, y)  # exact leave-one-out, as ours
    assert head.alpha_ == reference.alpha_
    ridge = Ridge(alpha=head.alpha_).fit(Xs, y)
    X_new = rng.normal(size=(20, d)) * 3
    np.testing.assert_allclose(head.predict(X_new), ridge.predict((X_new - X.mean(0)) / X.std(0)), rtol=1e-6,
                               atol=1e-8)


def test_ridge_head_generalizes_and_its_metrics_are_right():
    rng = np.random.default_rng(0)
    w = rng.normal(size=20)
    X, X_test = rng.normal(size=(300, 20)), rng.normal(size=(200, 20))
    y, y_test = X @ w + rng.normal(scale=0.3, size=300), X_test @ w + rng.normal(scale=0.3, size=200)
    scores = regression_metrics(y_test, RidgeHead().fit(X, y).predict(X_test))
    assert scores["r2"] > 0.95 and scores["rmse"] < 0.5, scores
    mean_only = regression_metrics(y_test, np.full_like(y_test, y.mean()))
    assert mean_only["r2"] < 0.05 and mean_only["mae"] > 5 * scores["mae"]
    two = RidgeHead().fit(X, np.stack([y, -2 * y], 1))
    assert two.predict(X_test).shape == (200, 2)
    np.testing.assert_allclose(two.predict(X_test)[:, 1], -2 * two.predict(X_test)[:, 0], rtol=1e-6)


def test_ridge_head_refuses_too_few_rows():
    with pytest.raises(UsageError, match="at least 3 rows"):
        RidgeHead().fit(np.ones((2, 3)), np.ones(2))
