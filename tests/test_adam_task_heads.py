"""The Adam heads for numbers and tags (heads.adam_tasks), on generated data whose answers are known."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from sklearn.base import clone

import headstart.heads.adam_tasks
from headstart.export.errors import UsageError
from headstart.heads.adam_tasks import MLPRegressorHead, SigmoidHead
from headstart.heads.regression import RidgeHead
from headstart.heads.tags import tag_metrics


def curved(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose two targets bend in their features: a sine of one and a square of another, a little noise."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    Y = np.stack([np.sin(1.5 * X[:, 0]), X[:, 1] ** 2], axis=1) * [1.0, 10.0] + 5  # unlike scales and offsets
    return X, Y + rng.normal(scale=0.1, size=Y.shape)


def tagged(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose three tags are linear rules of their features, one of them rare (about 10%)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 30)).astype(np.float32) + 3  # off the origin, as ReLU features are
    Y = np.stack([X[:, 0] > 3, X[:, 1] - X[:, 2] > 0.5, X[:, 3] + 0.5 * X[:, 4] > 5.9], axis=1)
    return X, Y


def dense(head, X: np.ndarray) -> np.ndarray:
    """The head's plain form recomputed: standardize, then the layers with ReLU between them."""
    h = (X.astype(np.float32) - head.mean_) / head.scale_
    for i, (W, b) in enumerate(head.layers_):
        h = h @ W + b
        h = np.maximum(h, 0) if i < len(head.layers_) - 1 else h
    return h


def onnx_dense(head, X: np.ndarray) -> np.ndarray:
    """What the bundle exports: heads.tuned.dense_nodes from the head's own mean_, scale_ and layers_."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from headstart.export.graph import IR_VERSION, OPSET
    from headstart.heads.tuned import dense_nodes

    nodes, inits, out = dense_nodes("x", head.mean_, head.scale_, head.layers_)
    width = head.layers_[-1][0].shape[1]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", X.shape[1]])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([out], {"x": X.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def regressor() -> MLPRegressorHead:
    X, Y = curved(1000, 0)
    return MLPRegressorHead().fit(X, Y[:, 0] + Y[:, 1])


@pytest.fixture(scope="module")
def tagger() -> SigmoidHead:
    X, Y = tagged(600, 0)
    return SigmoidHead().fit(X, Y, tags=["a", "b", "rare"])


def test_the_regressor_learns_a_curved_target_that_ridge_cannot(regressor):
    X, Y = curved(1000, 0)
    X_test, Y_test = curved(500, 1)
    y, y_test = Y.sum(1), Y_test.sum(1)
    r2 = regressor.score(X_test, y_test)
    ridge = RidgeHead().fit(X, y).score(X_test, y_test)
    assert r2 > 0.9 and r2 > ridge + 0.5, (r2, ridge)
    assert regressor.predict(X_test).shape == (500,) and regressor.n_outputs_ == 1
    assert len(regressor.history_) == regressor.epochs and "train_rmse" in regressor.history_[-1]


def test_the_regressor_predicts_several_targets_at_their_own_scales():
    X, Y = curved(1000, 0)
    X_test, Y_test = curved(500, 1)
    head = MLPRegressorHead().fit(X, Y, X_valid=X_test, y_valid=Y_test)
    predicted = head.predict(X_test)
    assert predicted.shape == (500, 2)
    r2 = 1 - ((Y_test - predicted) ** 2).sum(0) / ((Y_test - Y_test.mean(0)) ** 2).sum(0)
    assert (r2 > 0.9).all(), r2
    assert head.history_[-1]["valid_r2"] > 0.9  # validation rows are scored for the log, each epoch


def test_the_plain_form_is_the_prediction_and_exports_unchanged(regressor, tagger):
    X_test, _ = curved(300, 2)
    assert all(W.dtype == np.float32 and b.dtype == np.float32 for W, b in regressor.layers_)
    np.testing.assert_allclose(dense(regressor, X_test)[:, 0], regressor.predict(X_test), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(onnx_dense(regressor, X_test)[:, 0], regressor.predict(X_test), rtol=1e-5, atol=1e-4)
    X_tags, _ = tagged(300, 2)
    assert len(tagger.layers_) == 1 and tagger.layers_[0][0].shape == (30, 3)  # linear by default
    z = tagger.decision_function(X_tags)
    np.testing.assert_allclose(dense(tagger, X_tags), z, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(onnx_dense(tagger, X_tags), z, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(tagger.predict_proba(X_tags), 1 / (1 + np.exp(-z)), rtol=1e-5, atol=1e-6)
    assert (tagger.predict(X_tags) == (tagger.predict_proba(X_tags) >= tagger.thresholds_)).all()


def test_the_sigmoid_head_learns_each_tag_and_its_threshold(tagger):
    X, Y = tagged(600, 0)
    X_test, Y_test = tagged(400, 1)
    scores = tag_metrics(Y_test, tagger.predict_proba(X_test), tagger.predict(X_test), list(tagger.tags_))
    assert scores["mAP"] > 0.9 and scores["micro_f1"] > 0.85, scores
    assert tagger.tags_.tolist() == ["a", "b", "rare"]
    assert tagger.thresholds_.shape == (3,) and 0 < tagger.thresholds_.min() and tagger.thresholds_.max() < 1
    # features that say nothing of the tags cannot reach that: the same head on shuffled rows
    shuffled = SigmoidHead(min_steps=500).fit(X, Y[np.random.default_rng(2).permutation(len(Y))])
    assert tag_metrics(Y_test, shuffled.predict_proba(X_test), shuffled.predict(X_test), ["a", "b", "r"])["mAP"] < 0.6


def test_a_hidden_layer_before_the_sigmoids():
    X, Y = tagged(600, 0)
    X_test, Y_test = tagged(400, 1)
    head = SigmoidHead(hidden=(32,), min_steps=1000).fit(X, Y)
    assert [W.shape for W, _ in head.layers_] == [(30, 32), (32, 3)]
    assert tag_metrics(Y_test, head.predict_proba(X_test), head.predict(X_test), list(head.tags_))["mAP"] > 0.85
    np.testing.assert_allclose(dense(head, X_test), head.decision_function(X_test), rtol=1e-5, atol=1e-4)


def test_validation_rows_are_never_read_for_the_weights_or_thresholds():
    X, Y = tagged(300, 0)
    X_valid, Y_valid = tagged(100, 1)
    plain = SigmoidHead(min_steps=300).fit(X, Y)
    seen = []
    watched = SigmoidHead(min_steps=300).fit(X, Y, X_valid=X_valid, Y_valid=1 - Y_valid, log=seen.append)
    np.testing.assert_array_equal(plain.thresholds_, watched.thresholds_)
    for (W, b), (W2, b2) in zip(plain.layers_, watched.layers_, strict=True):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    assert seen == watched.history_ and "valid_loss" in seen[-1] and "valid_loss" not in plain.history_[-1]


def test_fits_repeat_with_the_seed():
    X, Y = tagged(200, 0)
    X_curve, Y_curve = curved(200, 0)
    for make, target in ((lambda **kw: SigmoidHead(hidden=(16,), dropout=0.2, min_steps=200, **kw), Y),
                         (lambda **kw: MLPRegressorHead(hidden=(16,), dropout=0.2, min_steps=200, **kw), Y_curve)):
        inputs = X if target is Y else X_curve
        a, b, c = (make(random_state=s).fit(inputs, target) for s in (0, 0, 1))
        assert all(np.array_equal(Wa, Wb) and np.array_equal(ba, bb)
                   for (Wa, ba), (Wb, bb) in zip(a.layers_, b.layers_, strict=True))
        assert not np.array_equal(a.layers_[0][0], c.layers_[0][0])
        assert clone(a).get_params() == a.get_params()


def test_target_shapes_that_do_not_fit_are_usage_errors():
    X, Y = tagged(50, 0)
    with pytest.raises(UsageError, match="0/1 for 50 rows"):
        SigmoidHead().fit(X, Y[:40])
    with pytest.raises(UsageError, match="0/1"):
        SigmoidHead().fit(X, Y[:, 0])
    with pytest.raises(UsageError, match="0/1"):
        SigmoidHead().fit(X, Y * 2.5)
    with pytest.raises(UsageError, match="2 tag names for 3 columns"):
        SigmoidHead().fit(X, Y, tags=["a", "b"])
    with pytest.raises(UsageError, match="folds"):
        SigmoidHead(folds=1).fit(X, Y)
    with pytest.raises(UsageError, match="for 50 rows"):
        MLPRegressorHead().fit(X, np.zeros(40))
    with pytest.raises(UsageError, match="numbers"):
        MLPRegressorHead().fit(X, np.zeros((50, 2, 2)))
    with pytest.raises(UsageError, match="numbers"):
        MLPRegressorHead().fit(X, np.array(["a"] * 50))
    with pytest.raises(UsageError, match="hidden sizes"):
        MLPRegressorHead(hidden=(0,)).fit(X, np.zeros(50))


def test_the_examples_run():
    result = doctest.testmod(headstart.heads.adam_tasks)
    assert result.attempted >= 4 and result.failed == 0
