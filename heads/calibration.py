"""Rows set aside and temperature scaling: the folds of the training rows (for out-of-fold scores), and the
temperature T that makes softmax(logits / T) calibrated, fitted on logits of rows the model did not train on."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.model_selection import LeaveOneOut, StratifiedKFold, StratifiedShuffleSplit

# Below this many rows in the smallest class's folds, leave-one-out (while the rows are few enough to afford it).
LOO_ROWS = 200
# Temperatures searched, and the rows below which none is fitted (T = 1): on 20 rows that a probe separates,
# the best temperature runs to 0, and is far too sure on new rows.
TEMPERATURES = (0.1, 10.0)
CALIBRATE_ROWS = 50
CALIBRATIONS = ("temperature", "none")


def make_folds(y: np.ndarray, folds: int, holdout_rows: int, seed: int | None) -> tuple[list, dict]:
    """[(train rows, test rows)] of class indices y, and how they were drawn (recorded in the head file)."""
    n, smallest = len(y), int(np.bincount(y).min())
    if n >= holdout_rows and smallest >= 10:
        split = StratifiedShuffleSplit(1, test_size=0.1, random_state=seed)
        return list(split.split(np.zeros(n), y)), {"method": "held-out 10%", "splits": 1, "seed": seed, "rows": n}
    if smallest < folds and n <= LOO_ROWS:
        return list(LeaveOneOut().split(np.zeros(n))), {"method": "leave-one-out", "splits": n, "seed": None,
                                                        "rows": n}
    k = max(2, min(folds, smallest))
    with warnings.catch_warnings():  # a class with a single row cannot be in every fold: said by the method name
        warnings.simplefilter("ignore", UserWarning)
        split = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), y))
    return split, {"method": f"stratified {k}-fold", "splits": k, "seed": seed, "rows": n}


def fit_temperature(logits: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> float:
    """The T in TEMPERATURES' range minimizing the (weighted) mean log loss of softmax(logits / T)."""
    weight = np.ones(len(y)) if weight is None else weight
    z = logits.astype(np.float64)

    def loss(log_t: float) -> float:
        return float(-(log_softmax(z / np.exp(log_t), axis=1)[np.arange(len(y)), y] * weight).sum() / weight.sum())

    lo, hi = np.log(TEMPERATURES)
    found = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x)) if found.fun < loss(0.0) else 1.0


def calibrate(logits: np.ndarray, y: np.ndarray, weight: np.ndarray | None, method: str) -> dict:
    """The record of a head's temperature scaling on held-out `logits` (n, k) of class indices y: method, rows,
    temperature (1.0 below CALIBRATE_ROWS rows)."""
    t = fit_temperature(logits, y, weight) if len(y) >= CALIBRATE_ROWS else 1.0
    return {"method": method, "rows": int(len(y)), "temperature": t}
