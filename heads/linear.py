"""L-BFGS logistic regression on float32 features: scikit-learn's objective, its products in float32 BLAS.

The objective is LogisticRegression's with C = 1 / (l2 * n): the (weighted) mean log loss plus l2 / 2 times the
weights' squares, the intercept unpenalized; binary as one sigmoid column, multinomial for more classes. A fit
can start from another's solution (`init`), which is what makes a path over a grid of penalties cheap.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def fit_logistic(Z: np.ndarray, y: np.ndarray, k: int, l2: float, weight: np.ndarray | None = None,
                 init: np.ndarray | None = None, max_iter: int = 2000, tol: float = 1e-5
                 ) -> tuple[np.ndarray, int]:
    """The optimum as one flat float64 vector (W (d, m) then b (m,), m = 1 for 2 classes, else k), and the
    iterations taken. Z: (n, d) float32; y: (n,) class indices below k; weight: (n,) per-row weights."""
    n, d = Z.shape
    m = 1 if k == 2 else k
    sw = np.ones(n) if weight is None else np.asarray(weight, np.float64)
    sw = (sw / sw.sum()).astype(np.float32)
    Y = (y == 1).astype(np.float32)[:, None] if m == 1 else np.eye(k, dtype=np.float32)[y]
    Z = np.asarray(Z, np.float32)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        W = theta[:d * m].reshape(d, m).astype(np.float32)
        z = Z @ W + theta[d * m:].astype(np.float32)
        if m == 1:  # log(1 + e^z) - y z, and its derivative sigmoid(z) - y
            loss = np.logaddexp(0, z) - Y * z
            g = 1 / (1 + np.exp(-z)) - Y
        else:
            top = z.max(1, keepdims=True)
            e = np.exp(z - top)
            total = e.sum(1, keepdims=True)
            loss = (np.log(total) + top - (z * Y).sum(1, keepdims=True))
            g = e / total - Y
        g *= sw[:, None]
        value = float(loss[:, 0].astype(np.float64) @ sw) + 0.5 * l2 * float(np.dot(theta[:d * m], theta[:d * m]))
        grad = np.concatenate([(Z.T @ g).astype(np.float64).ravel() + l2 * theta[:d * m], g.sum(0, dtype=np.float64)])
        return value, grad

    x0 = np.zeros(d * m + m) if init is None else init
    found = minimize(objective, x0, jac=True, method="L-BFGS-B",
                     options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    return found.x, int(found.nit)


def logits_of(theta: np.ndarray, Z: np.ndarray, k: int) -> np.ndarray:
    """(n, k) logits of a solution of fit_logistic: binary as [0, z], so softmax gives sigmoid(z)."""
    W, b = as_layer(theta, Z.shape[1], k)
    return np.asarray(Z, np.float32) @ W + b


def as_layer(theta: np.ndarray, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(W (d, k), b (k,)) float32 of a solution: one dense layer whose softmax is the model's probabilities."""
    m = 1 if k == 2 else k
    W, b = theta[:d * m].reshape(d, m).astype(np.float32), theta[d * m:].astype(np.float32)
    if m == 1:  # sigmoid(z) == softmax([0, z])[1]
        W, b = np.hstack([np.zeros_like(W), W]), np.array([0.0, b[0]], np.float32)
    return np.ascontiguousarray(W), b


def out_of_fold_logits(Z: np.ndarray, y: np.ndarray, k: int, l2: float, weight: np.ndarray | None,
                       theta: np.ndarray, folds: list, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, k) of each fold's test rows by a fit on its other rows, started from `theta`, and the rows
    tested (the folds' test rows, concatenated)."""
    z = np.zeros((len(y), k), np.float32)
    for tr, te in folds:
        part, _ = fit_logistic(Z[tr], y[tr], k, l2, None if weight is None else weight[tr], init=theta,
                               max_iter=max_iter, tol=1e-4)
        z[te] = logits_of(part, Z[te], k)
    return z, np.concatenate([te for _, te in folds])
