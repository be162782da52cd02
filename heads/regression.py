"""Numbers from images (an age, a count, a score): ridge regression with its penalty chosen by leave-one-out.

`RidgeHead` standardizes the features, centres the targets and solves ridge in closed form through one SVD of
the training rows, which also gives every penalty's exact leave-one-out error at once (the hat matrix's
diagonal), so the penalty is chosen on the training rows alone, as scikit-learn's `RidgeCV` does.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from headstart.export.errors import UsageError

# Penalties tried, relative to the largest squared singular value of the standardized rows: scale-free.
RELATIVE_ALPHAS = tuple(10.0 ** np.arange(-7, 1.5, 0.5))


class RidgeHead(RegressorMixin, BaseEstimator):
    """Ridge regression on standardized features, the penalty chosen by exact leave-one-out error.

    Parameters
    ----------
    alphas : tuple of float, optional
        Penalties tried; default a log grid relative to the data's scale (1e-7 to 10 times the largest squared
        singular value of the standardized training rows).

    Attributes
    ----------
    alpha_ : float
        The chosen penalty.
    cv_results_ : list of dict
        Each penalty's leave-one-out mean squared error.
    coef_ : ndarray of shape (n_features,) or (n_features, n_targets)
        Weights on the raw features (standardization folded in); `intercept_` their offset.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(100, 5))
    >>> y = X @ np.arange(5.0) + 1
    >>> round(RidgeHead().fit(X, y).score(X, y), 3)
    1.0
    """

    def __init__(self, alphas: tuple[float, ...] | None = None) -> None:
        self.alphas = alphas

    def fit(self, X: np.ndarray, y: np.ndarray) -> RidgeHead:
        """Choose the penalty by leave-one-out on these rows and solve ridge on all of them.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,) or (n_samples, n_targets)
        """
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        if len(X) < 3:
            raise UsageError(f"ridge regression needs at least 3 rows, got {len(X)}")
        Y = y.reshape(len(y), -1)
        mean, std = X.mean(0), X.std(0)
        std[std < 1e-12] = 1.0
        Xs, y_mean = (X - mean) / std, Y.mean(0)
        U, s, Vt = np.linalg.svd(Xs, full_matrices=False)
        UtY = U.T @ (Y - y_mean)
        alphas = (tuple(a * s[0] ** 2 for a in RELATIVE_ALPHAS) if self.alphas is None else tuple(self.alphas))
        if any(not a > 0 for a in alphas):
            raise UsageError(f"alphas must be positive, got {alphas!r}")
        errors = []
        for a in alphas:
            shrink = s ** 2 / (s ** 2 + a)
            fitted = U @ (shrink[:, None] * UtY)
            hat = (U ** 2) @ shrink + 1 / len(X)  # the diagonal of the hat matrix, the intercept's 1/n included
            errors.append(float((((Y - y_mean - fitted) / (1 - hat)[:, None]) ** 2).mean()))
        best = int(np.argmin(errors))
        self.alpha_ = float(alphas[best])
        self.cv_results_ = [{"alpha": float(a), "loo_mse": e} for a, e in zip(alphas, errors, strict=True)]
        W = Vt.T @ ((s / (s ** 2 + self.alpha_))[:, None] * UtY) / std[:, None]
        b = y_mean - mean @ W
        self.coef_, self.intercept_ = (W[:, 0], float(b[0])) if y.ndim == 1 else (W, b)
        return self

    def dense_layers(self) -> tuple[np.ndarray, np.ndarray, list, bool]:
        """(mean, scale, [(W, b)], normalize): one linear layer on the raw features, as bundle.dense_nodes builds it."""
        d = self.coef_.shape[0]
        W = np.asarray(self.coef_, np.float32).reshape(d, -1)
        b = np.atleast_1d(self.intercept_).astype(np.float32)
        return np.zeros(d, np.float32), np.ones(d, np.float32), [(W, b)], False

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The predicted values, (n,) or (n, n_targets)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_ + self.intercept_


def regression_metrics(y: np.ndarray, predicted: np.ndarray) -> dict:
    """Mean absolute error, root mean squared error and R2 (1 - residual / total sum of squares)."""
    y, predicted = np.asarray(y, np.float64), np.asarray(predicted, np.float64)
    residual = y - predicted
    total = ((y - y.mean(0)) ** 2).sum()
    return {"n": len(y), "mae": float(np.abs(residual).mean()), "rmse": float(np.sqrt((residual ** 2).mean())),
            "r2": float(1 - (residual ** 2).sum() / total) if total > 0 else float("nan")}
