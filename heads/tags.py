"""Several labels an image (multi-label tags): one sigmoid per tag, its threshold chosen by cross-validation.

`TagHead` is the linear probe of `AutoHead` for tags: L-BFGS logistic regression per tag on L2-normalized
features, its penalty chosen over a log grid by the out-of-fold log loss of k folds of the training rows (one
penalty for all tags), then each tag's decision threshold set to the one maximizing that tag's out-of-fold F1.
The winner is refit on all rows. Validation rows are never read for either choice.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.base import BaseEstimator
from sklearn.model_selection import KFold
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from headstart.export.errors import UsageError

from .base import l2_normalize
from .compute import cores, share

L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def fit_sigmoids(Z: np.ndarray, Y: np.ndarray, l2: float, init: np.ndarray | None = None,
                 max_iter: int = 1000, tol: float = 1e-5) -> np.ndarray:
    """One logistic regression per column of `Y` (n, t) in {0, 1}, all in one L-BFGS run (the objective is their
    sum, so each column's optimum is its own): the flat solution, W (d, t) then b (t,)."""
    n, d = Z.shape
    t = Y.shape[1]
    Z, Y = np.asarray(Z, np.float32), np.asarray(Y, np.float32)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[:d * t].reshape(d, t).astype(np.float32)
        z = Z @ W + theta[d * t:].astype(np.float32)
        loss = (np.logaddexp(0, z) - Y * z).sum(dtype=np.float64) / n
        g = (np.exp(-np.logaddexp(0, -z)) - Y) / n  # sigmoid without overflow
        value = float(loss) + 0.5 * l2 * float(theta[:d * t] @ theta[:d * t])
        grad = np.concatenate([(Z.T @ g).astype(np.float64).ravel() + l2 * theta[:d * t], g.sum(0, dtype=np.float64)])
        return value, grad

    x0 = np.zeros(d * t + t) if init is None else init
    found = minimize(objective, x0, jac=True, method="L-BFGS-B",
                     options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    return found.x


def _logits(theta: np.ndarray, Z: np.ndarray, t: int) -> np.ndarray:
    d = Z.shape[1]
    return np.asarray(Z, np.float32) @ theta[:d * t].reshape(d, t).astype(np.float32) + theta[d * t:].astype(np.float32)


def _normalized(X: np.ndarray) -> np.ndarray:
    """L2-normalized rows at the length of a standardized row (sqrt(d)), as AutoHead's probes fit them."""
    return l2_normalize(X) * np.float32(np.sqrt(X.shape[1]))


def tag_matrix(Y: np.ndarray | None, n: int, what: str) -> np.ndarray:
    """A 0/1 tag matrix as float32 (n, n_tags); anything else is a UsageError naming `what`."""
    Y = np.asarray(Y)
    if Y.ndim != 2 or len(Y) != n or Y.shape[1] == 0 or not np.isin(Y, (0, 1)).all():
        raise UsageError(f"{what} must be an (n_samples, n_tags) array of 0/1 for {n} rows, got shape {Y.shape}")
    return Y.astype(np.float32)


def tag_names(tags: list[str] | None, n_tags: int) -> np.ndarray:
    """The tags' names as str (default "0", "1", ...); as many as the tag matrix has columns."""
    names = np.array([str(i) for i in range(n_tags)] if tags is None else [str(t) for t in tags])
    if len(names) != n_tags:
        raise UsageError(f"{len(names)} tag names for {n_tags} columns")
    return names


def best_thresholds(Y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Per column, the probability threshold maximizing F1 over the given rows (0.5 where a tag never occurs)."""
    out = np.full(Y.shape[1], 0.5)
    for j in range(Y.shape[1]):
        y, p = Y[:, j].astype(bool), proba[:, j]
        if not y.any() or y.all():
            continue
        order = np.argsort(-p, kind="stable")
        hits = np.cumsum(y[order])
        f1 = 2 * hits / (np.arange(1, len(p) + 1) + y.sum())
        i = int(np.argmax(f1))
        # halfway to the next lower score, so the rows at the cut are kept and a new row's tiny shift does not flip
        below = p[order[i + 1]] if i + 1 < len(p) else 0.0
        out[j] = float((p[order[i]] + below) / 2)
    return out


class TagHead(BaseEstimator):
    """A multi-label head: one sigmoid per tag, the penalty and each tag's threshold chosen by cross-validation.

    Parameters
    ----------
    folds : int
        Shuffled folds of the training rows (at most one per row) for the penalty and the thresholds.
    l2_grid : tuple of float, optional
        Penalties on the mean loss tried (default 1 down to 1e-5, a decade apart), strongest first.
    random_state : int or None
        Seed of the folds.

    Attributes
    ----------
    tags_ : ndarray of str
        The tags, in the order of the columns of `Y`.
    l2_ : float
        The chosen penalty.
    thresholds_ : ndarray of shape (n_tags,)
        Each tag's decision threshold on its probability.
    cv_results_ : list of dict
        Each penalty's out-of-fold mean log loss.
    coef_ : ndarray of shape (n_features, n_tags)
        Weights on the normalized features; `intercept_` (n_tags,) their biases.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> Y = np.stack([X[:, 0] > 0, X[:, 1] > 0.5], axis=1)
    >>> head = TagHead().fit(X, Y, tags=["a", "b"])
    >>> head.predict(X[:2]).shape
    (2, 2)
    """

    def __init__(self, folds: int = 5, l2_grid: tuple[float, ...] | None = None,
                 random_state: int | None = 0) -> None:
        self.folds = folds
        self.l2_grid = l2_grid
        self.random_state = random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, tags: list[str] | None = None) -> TagHead:
        """Choose the penalty and thresholds on folds of these rows, then refit on all of them.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        Y : ndarray of shape (n_samples, n_tags)
            1 (or True) where a row has the tag.
        tags : list of str, optional
            The tags' names (default "0", "1", ...).
        """
        X = validate_data(self, X, dtype=np.float32)
        Y = tag_matrix(Y, len(X), "tags")
        if self.folds < 2:
            raise UsageError(f"folds must be at least 2, got {self.folds!r}")
        if len(X) < 2:
            raise UsageError(f"tags need at least 2 training rows (one a fold), got {len(X)}")
        self.tags_ = tag_names(tags, Y.shape[1])
        with threadpool_limits(1, user_api="blas"):  # small products: BLAS's threads cost more than they save
            return self._fit(_normalized(X), Y)

    def _fit(self, Z: np.ndarray, Y: np.ndarray) -> TagHead:
        grid = sorted(L2_GRID if self.l2_grid is None else self.l2_grid, reverse=True)
        folds = list(KFold(min(self.folds, len(Z)), shuffle=True, random_state=self.random_state).split(Z))
        oof = {l2: np.zeros_like(Y) for l2 in grid}
        solutions: dict[float, list] = {l2: [None] * len(folds) for l2 in grid}  # by fold: the same mean each run

        def path(k: int) -> None:
            train, test = folds[k]
            theta = None
            for l2 in grid:  # warm-started along the path, strongest penalty first
                theta = fit_sigmoids(Z[train], Y[train], l2, init=theta, max_iter=300, tol=1e-4)
                oof[l2][test] = _logits(theta, Z[test], Y.shape[1])
                solutions[l2][k] = theta

        # the folds shared out among the cores, a group each (their products let go of the GIL)
        groups = [range(i, len(folds), cores()) for i in range(min(cores(), len(folds)))]
        share([lambda g=g: [path(k) for k in g] for g in groups])
        losses = {l2: float((np.logaddexp(0, z) - Y * z).mean()) for l2, z in oof.items()}
        self.l2_ = min(grid, key=lambda l2: (losses[l2], -l2))
        self.cv_results_ = [{"l2": l2, "log_loss": losses[l2]} for l2 in grid]
        self.thresholds_ = best_thresholds(Y, 1 / (1 + np.exp(-oof[self.l2_])))
        # the refit starts from the folds' mean solution, near its own optimum: the same answer in fewer steps
        theta = fit_sigmoids(Z, Y, self.l2_, init=np.mean(solutions[self.l2_], axis=0))
        d, t = Z.shape[1], Y.shape[1]
        self.coef_ = theta[:d * t].reshape(d, t).astype(np.float32)
        self.intercept_ = theta[d * t:].astype(np.float32)
        return self

    def dense_layers(self) -> tuple[np.ndarray, np.ndarray, list, bool]:
        """(mean, scale, [(W, b)], normalize): the head as bundle.dense_nodes builds it, (unit rows - 0) * sqrt(d)."""
        d = self.coef_.shape[0]
        return (np.zeros(d, np.float32), np.full(d, 1 / np.sqrt(d), np.float32), [(self.coef_, self.intercept_)],
                True)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(n, n_tags) logits."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        return _normalized(X) @ self.coef_ + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, n_tags) probability of each tag, independently."""
        return 1 / (1 + np.exp(-self.decision_function(X)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, n_tags) booleans: each tag's probability at or above its threshold."""
        return self.predict_proba(X) >= self.thresholds_


def f1_scores(Y: np.ndarray, predicted: np.ndarray) -> tuple[float, np.ndarray]:
    """Micro F1 over all (row, tag) cells, and each tag's F1 (1.0 for a tag neither given nor predicted)."""
    Y, predicted = np.asarray(Y, bool), np.asarray(predicted, bool)
    tp, fp, fn = (Y & predicted).sum(0), (~Y & predicted).sum(0), (Y & ~predicted).sum(0)
    per_tag = np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    return float(micro), per_tag


def tag_metrics(Y: np.ndarray, proba: np.ndarray, predicted: np.ndarray, tags: list[str]) -> dict:
    """Mean average precision (over tags that occur), micro and macro F1, and each tag's AP and F1."""
    from sklearn.metrics import average_precision_score

    Y = np.asarray(Y).astype(bool)
    ap = {t: float(average_precision_score(Y[:, j], proba[:, j])) for j, t in enumerate(tags) if Y[:, j].any()}
    micro, per_tag = f1_scores(Y, predicted)
    return {"n": len(Y), "mAP": float(np.mean(list(ap.values()))) if ap else float("nan"), "micro_f1": micro,
            "macro_f1": float(np.mean(per_tag)), "per_tag": {t: {"ap": ap.get(t), "f1": float(f)}
                                                           for t, f in zip(tags, per_tag, strict=True)}}
