"""Weighted k-nearest neighbours on L2-normalized features: the k-NN evaluation of DINOv2, as an estimator.

A query's neighbours are the k training rows of highest cosine similarity s; each votes for its class with
weight exp(s / tau) (times its class's weight under class_weight="balanced"). Probabilities are the votes'
shares, smoothed: p = (share + alpha) / (1 + n_classes * alpha), so that no class is impossible and a log loss
stays finite. The logits are log(p), so that softmax(logits) == p, as in the bundled graph.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from headstart.export.errors import UsageError

from .base import NORM_EPS, DenseHead, EpochLog, l2_normalize, softmax
from .calibration import calibrate
from .metrics import loss_and_accuracy

# Query rows scored at once: a (rows, n_train) block of similarities.
QUERY_ROWS = 1024
# Training rows that calibrate's leave-one-out votes on at most: enough for one temperature.
LOO_QUERIES = 2000


def nearest(sims: np.ndarray, k: int) -> np.ndarray:
    """(n, min(k, m)) column indices of each row's k largest similarities, largest first."""
    n, m = sims.shape
    k = min(k, m)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < m else np.broadcast_to(np.arange(m), (n, m))
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable"), 1)


def knn_log_proba(sims: np.ndarray, labels: np.ndarray, k: int, tau: float, alpha: float,
                  vote_weight: np.ndarray, top: np.ndarray | None = None) -> np.ndarray:
    """Smoothed log-probabilities (n, C) from similarities (n, m) to m rows of class indices `labels`; `top`:
    nearest(sims, K) for some K >= k, so that several k share one search."""
    top = (nearest(sims, k) if top is None else top)[:, :k]
    s = np.take_along_axis(sims, top, axis=1)
    w = np.exp((s - s.max(axis=1, keepdims=True)) / tau)  # the largest weight is 1: no overflow
    votes = (np.eye(len(vote_weight), dtype=np.float32)[labels[top]] * (w * vote_weight[labels[top]])[..., None]).sum(1)
    share = votes / votes.sum(axis=1, keepdims=True)
    return np.log((share + alpha) / (1 + len(vote_weight) * alpha)).astype(np.float32)


class KNNHead(DenseHead):
    """Weighted k-NN (cosine similarity, votes exp(s / tau)) over the stored, L2-normalized training rows.

    The head file stores the rows; the bundle is a MatMul against them and a TopK.

    Parameters
    ----------
    n_neighbors : int
        How many nearest training rows vote.
    tau : float
        Temperature of the votes, exp(similarity / tau).
    alpha : float
        Smoothing added to each class's share of the votes, so no probability is 0.
    calibrate : {"none", "temperature"}
        "temperature": divide the logits by a temperature fitted on leave-one-out logits (each row's vote among
        the other rows, on up to 2,000 rows drawn with `random_state`; from 50 rows); kept in the head file and
        the bundled graph.
    class_weight : {None, "balanced"}
        "balanced" weighs each class's votes inversely to its frequency.
    random_state : int or None
        Seed of the rows that `calibrate` draws.

    Attributes
    ----------
    rows_ : numpy.ndarray
        (m, D) float32, the training rows at unit length.
    labels_ : numpy.ndarray
        (m,) their class indices.
    vote_weight_ : numpy.ndarray
        (n_classes,) each class's vote weight (from `class_weight`).
    temperature_ : float
        Divides the logits (1.0 uncalibrated); `calibration_` says how it was fitted (method, rows).

    Examples
    --------
    >>> import numpy as np, headstart as hs
    >>> X, y = np.random.default_rng(0).normal(size=(40, 8)), np.repeat(["cat", "dog"], 20)
    >>> X[y == "dog"] += 2
    >>> hs.KNNHead(n_neighbors=5).fit(X, y).predict_proba(X[:3]).shape
    (3, 2)
    """

    standardize = False  # not a parameter: the rows are normalized, never standardized

    def __init__(self, n_neighbors: int = 20, tau: float = 0.07, alpha: float = 0.01, calibrate: str = "none",
                 class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.n_neighbors = n_neighbors
        self.tau = tau
        self.alpha = alpha
        self.calibrate = calibrate
        self.class_weight = class_weight
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        if self.n_neighbors < 1 or self.tau <= 0 or not 0 < self.alpha < 1:
            raise UsageError(f"KNNHead: need n_neighbors >= 1, tau > 0 and 0 < alpha < 1; got {self.get_params()}")

    def _fit(self, X: np.ndarray, y: np.ndarray, valid: tuple | None, log: EpochLog) -> None:
        self.rows_, self.labels_ = l2_normalize(X), y.astype(np.int64)
        counts = np.bincount(y, minlength=len(self.classes_))
        balanced = len(y) / (len(counts) * np.maximum(counts, 1))
        self.vote_weight_ = (balanced if self.class_weight == "balanced" else np.ones(len(counts))).astype(np.float32)
        self.layers_ = []
        # Its own training rows are their own nearest neighbours: the train scores say little, as for any k-NN.
        self._log(log, 1, 0.0, loss_and_accuracy(y, softmax(self._logits(X))), valid)
        if self.calibrate == "temperature" and len(y) > 1:
            rows = self._leave_one_out_rows()
            z = self._leave_one_out_logits(rows)
            self.calibration_ = calibrate(z, y[rows], self.vote_weight_[y[rows]], "leave-one-out")
            self.temperature_ = self.calibration_["temperature"]

    def _leave_one_out_rows(self) -> np.ndarray:
        m = len(self.rows_)
        if m <= LOO_QUERIES:
            return np.arange(m)
        return np.sort(np.random.default_rng(self.random_state).choice(m, LOO_QUERIES, replace=False))

    def _leave_one_out_logits(self, rows: np.ndarray) -> np.ndarray:
        """Logits (len(rows), n_classes) of training rows voted on by the other training rows."""
        out = np.empty((len(rows), len(self.classes_)), np.float32)
        k = min(self.n_neighbors, len(self.rows_) - 1)
        for i in range(0, len(rows), QUERY_ROWS):
            part = rows[i:i + QUERY_ROWS]
            sims = self.rows_[part] @ self.rows_.T
            sims[np.arange(len(part)), part] = -np.inf  # not its own neighbour
            out[i:i + QUERY_ROWS] = knn_log_proba(sims, self.labels_, k, self.tau, self.alpha, self.vote_weight_)
        return out

    def _logits(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((len(X), len(self.classes_)), np.float32)
        for i in range(0, len(X), QUERY_ROWS):
            sims = l2_normalize(X[i:i + QUERY_ROWS]) @ self.rows_.T
            out[i:i + QUERY_ROWS] = knn_log_proba(sims, self.labels_, self.n_neighbors, self.tau, self.alpha,
                                                  self.vote_weight_)
        return out

    def onnx_nodes(self, x: str, prefix: str = "head.") -> tuple[list, list, str]:
        """Nodes from `x`, (N, D) float32 features, to the logits log(p): normalize, MatMul, TopK, weighted votes."""
        k = min(self.n_neighbors, len(self.rows_))
        onehot = np.eye(len(self.classes_), dtype=np.float32)[self.labels_] * self.vote_weight_
        c = len(self.classes_)
        inits = [numpy_helper.from_array(np.ascontiguousarray(self.rows_.T), f"{prefix}rows_t"),
                 numpy_helper.from_array(onehot, f"{prefix}votes"),
                 numpy_helper.from_array(np.array([k], np.int64), f"{prefix}k"),
                 numpy_helper.from_array(np.array([1], np.int64), f"{prefix}axis1"),
                 numpy_helper.from_array(np.array([2], np.int64), f"{prefix}axis2"),
                 numpy_helper.from_array(np.array(NORM_EPS, np.float32), f"{prefix}eps"),
                 numpy_helper.from_array(np.array(self.tau, np.float32), f"{prefix}tau"),
                 numpy_helper.from_array(np.array(self.alpha, np.float32), f"{prefix}alpha"),
                 numpy_helper.from_array(np.array(1 + c * self.alpha, np.float32), f"{prefix}total")]
        p = prefix
        nodes = [helper.make_node("ReduceL2", [x], [f"{p}norm"], axes=[1], keepdims=1),
                 helper.make_node("Max", [f"{p}norm", f"{p}eps"], [f"{p}norm_eps"]),
                 helper.make_node("Div", [x, f"{p}norm_eps"], [f"{p}unit"]),
                 helper.make_node("MatMul", [f"{p}unit", f"{p}rows_t"], [f"{p}sims"]),
                 helper.make_node("TopK", [f"{p}sims", f"{p}k"], [f"{p}top", f"{p}top_rows"], axis=1),
                 helper.make_node("ReduceMax", [f"{p}top"], [f"{p}top_max"], axes=[1], keepdims=1),
                 helper.make_node("Sub", [f"{p}top", f"{p}top_max"], [f"{p}top_shift"]),
                 helper.make_node("Div", [f"{p}top_shift", f"{p}tau"], [f"{p}top_scaled"]),
                 helper.make_node("Exp", [f"{p}top_scaled"], [f"{p}w"]),
                 helper.make_node("Unsqueeze", [f"{p}w", f"{p}axis2"], [f"{p}w3"]),
                 helper.make_node("Gather", [f"{p}votes", f"{p}top_rows"], [f"{p}onehot"], axis=0),
                 helper.make_node("Mul", [f"{p}onehot", f"{p}w3"], [f"{p}weighted"]),
                 helper.make_node("ReduceSum", [f"{p}weighted", f"{p}axis1"], [f"{p}votes_n"], keepdims=0),
                 helper.make_node("ReduceSum", [f"{p}votes_n", f"{p}axis1"], [f"{p}votes_total"], keepdims=1),
                 helper.make_node("Div", [f"{p}votes_n", f"{p}votes_total"], [f"{p}share"]),
                 helper.make_node("Add", [f"{p}share", f"{p}alpha"], [f"{p}smoothed"]),
                 helper.make_node("Div", [f"{p}smoothed", f"{p}total"], [f"{p}proba"]),
                 helper.make_node("Log", [f"{p}proba"], [f"{p}logits"])]
        return nodes, inits, f"{p}logits"

