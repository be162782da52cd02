"""Confident learning (Northcutt, Jiang and Chuang, JAIR 2021): which given labels out-of-fold probabilities doubt.

The steps of cleanlab's `find_label_issues` with its defaults (filter by noise rate, at least one row kept per
class), written for plain arrays:

1. a threshold per class: the mean probability of that class over the rows labelled with it (self-confidence);
2. the confident joint C[given, true]: each row counts under the class whose probability reaches that class's
   threshold (the likeliest such class where several do); rows reaching none are not counted;
3. C calibrated so that each row sums to its class's count of given labels and the whole to n;
4. for every off-diagonal cell (given i, true j), the C[i, j] rows labelled i with the largest margin
   p_j - p_i are issues; a row the model predicts as its given label is never one;
5. issues ranked by self-confidence p_given (or the normalized margin p_given - max other), least first.
"""

from __future__ import annotations

import numpy as np

from headstart.export.errors import UsageError

RANKINGS = ("self_confidence", "normalized_margin")


def confident_thresholds(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """(K,) the mean probability of class k over the rows labelled k (1 for a class no row has)."""
    k = proba.shape[1]
    out = np.ones(k)
    for c in range(k):
        rows = labels == c
        if rows.any():
            out[c] = proba[rows, c].mean()
    return out


def confident_joint(labels: np.ndarray, proba: np.ndarray, calibrate: bool = True) -> np.ndarray:
    """(K, K) counts of rows by given label (rows) and confidently guessed true label (columns).

    Parameters
    ----------
    labels : numpy.ndarray
        (n,) given class indices in 0..K-1.
    proba : numpy.ndarray
        (n, K) out-of-fold predicted probabilities.
    calibrate : bool
        Scale each row to its class's count of given labels, and the whole to n (cleanlab's default).

    Returns
    -------
    numpy.ndarray
        (K, K) int64 counts.
    """
    labels = np.asarray(labels, np.int64)
    n, k = proba.shape
    above = proba >= confident_thresholds(labels, proba) - 1e-6  # the tolerance cleanlab allows
    counted = above.any(1)
    # Several classes confident: the likeliest; one: that one.
    guess = np.where(above.sum(1) > 1, proba.argmax(1), above.argmax(1))
    joint = np.zeros((k, k), np.int64)
    np.add.at(joint, (labels[counted], guess[counted]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))  # every class keeps one correctly labelled row
    if not calibrate:
        return joint
    counts = np.bincount(labels, minlength=k).astype(float)
    scaled = joint / np.maximum(joint.sum(1, keepdims=True), 1) * counts[:, None]
    scaled = scaled / max(scaled.sum(), 1e-12) * n
    return np.vstack([_round_keeping_sum(row) for row in scaled])


def _round_keeping_sum(values: np.ndarray) -> np.ndarray:
    """Integers near `values` whose sum is the rounded sum of `values` (largest remainders get the units)."""
    floor = np.floor(values)
    short = int(round(values.sum() - floor.sum()))
    order = np.argsort(-(values - floor), kind="stable")
    out = floor.astype(np.int64)
    out[order[:max(short, 0)]] += 1
    return out


def label_quality(labels: np.ndarray, proba: np.ndarray, method: str = "self_confidence") -> np.ndarray:
    """(n,) how much each given label is believed, in [0, 1]: low first is most doubtful.

    ``self_confidence``: p_given; ``normalized_margin``: (p_given - max other p + 1) / 2.
    """
    labels = np.asarray(labels, np.int64)
    given = proba[np.arange(len(labels)), labels]
    if method == "self_confidence":
        return given
    if method == "normalized_margin":
        other = proba.copy()
        other[np.arange(len(labels)), labels] = -np.inf
        return (given - other.max(1) + 1) / 2
    raise UsageError(f"ranking {method!r}: expected one of {', '.join(RANKINGS)}")


def find_label_issues(labels: np.ndarray, proba: np.ndarray, rank_by: str = "self_confidence",
                      min_per_class: int = 1) -> np.ndarray:
    """Indices of the rows whose given label is likely wrong, most doubtful first.

    Parameters
    ----------
    labels : numpy.ndarray
        (n,) given class indices in 0..K-1.
    proba : numpy.ndarray
        (n, K) out-of-fold predicted probabilities (each row sums to 1).
    rank_by : {"self_confidence", "normalized_margin"}
        The order of the issues.
    min_per_class : int
        Never flag a class's rows below this many kept.

    Returns
    -------
    numpy.ndarray
        int64 indices into the rows.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.05, 0.95]])
    >>> find_label_issues(np.array([0, 0, 1, 1, 0]), p).tolist()
    [4]
    """
    labels = np.asarray(labels, np.int64)
    proba = np.asarray(proba, np.float64)
    if proba.ndim != 2 or len(proba) != len(labels):
        raise UsageError(f"proba must be (n, K) for n={len(labels)} labels, got shape {proba.shape}")
    if rank_by not in RANKINGS:
        raise UsageError(f"ranking {rank_by!r}: expected one of {', '.join(RANKINGS)}")
    k = proba.shape[1]
    prune = _keep_per_class(confident_joint(labels, proba), min_per_class)
    issue = np.zeros(len(labels), bool)
    for given in range(k):
        rows = np.flatnonzero(labels == given)
        if len(rows) <= min_per_class:
            continue
        for true in range(k):
            m = int(prune[given, true])
            if true == given or m <= 0:
                continue
            margin = proba[rows, true] - proba[rows, given]
            issue[rows[np.argsort(-margin, kind="stable")[:m]]] = True
    issue &= proba.argmax(1) != labels
    found = np.flatnonzero(issue)
    return found[np.argsort(label_quality(labels[found], proba[found], rank_by), kind="stable")]


def _keep_per_class(joint: np.ndarray, n: int) -> np.ndarray:
    """The joint with each diagonal raised to at least `n`, the off-diagonal cells of its row lowered evenly."""
    out = joint.astype(float)
    for i in range(len(out)):
        raise_by = max(n - out[i, i], 0)
        if raise_by:
            off = [j for j in range(len(out)) if j != i and out[i, j] > 0]
            for j in off:
                out[i, j] = max(out[i, j] - raise_by / len(off), 0)
            out[i, i] = n
    return np.round(out).astype(np.int64)
