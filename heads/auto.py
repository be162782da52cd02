"""The best head for the data at hand, chosen by cross-validation on the training rows alone: `AutoHead`.

The linear-probe protocol of CLIP's and DINOv2's evaluations: L-BFGS logistic regression over a log grid of its
penalty (warm-started along the path, from the strongest penalty down), on standardized and on L2-normalized
features; weighted k-NN on normalized features (DINOv2); the Adam heads once the data are large enough to need
them. Every candidate is scored on the same folds of the training rows (out-of-fold log loss); the winner, the
first candidate in a fixed order of preference within one standard error of the least loss, is refit on all
rows, and a temperature fitted on its out-of-fold logits calibrates its probabilities.
Validation rows are never read for the choice: `fit` takes them only to log the refit winner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.special import log_softmax
from sklearn.base import BaseEstimator
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from headstart.export.errors import UsageError

from .base import FLOATS, DenseHead, EpochLog, FromLogits, checked, l2_normalize, two_classes
from .calibration import CALIBRATE_ROWS, fit_temperature, make_folds
from .compute import cores
from .knn import QUERY_ROWS, KNNHead, knn_log_proba, nearest
from .linear import fit_logistic, logits_of
from .metrics import wilson
from .models import LogisticHead, MLPHead, SoftmaxHead

# The penalties on the mean loss tried, strongest first (the order of the warm-started path).
L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# L-BFGS's iterations and tolerance per point of the path during selection: warm starts need few; the refit
# gets LogisticHead's own.
PATH_ITER = 300
PATH_TOL = 1e-4


class AutoHead(FromLogits, BaseEstimator):
    """The best head for the data: candidates compared by cross-validation on the training rows, the winner refit.

    Parameters
    ----------
    folds : int
        Stratified folds (shuffled with `random_state`), never more than the smallest class has rows;
        leave-one-out below that while there are at most 200 rows. From `holdout_rows` rows on, one stratified
        held-out tenth of the training rows instead (DINOv2's protocol).
    l2_grid : tuple of float, optional
        Logistic penalties on the mean loss (default: 1 down to 1e-6, a decade apart).
    neighbors : tuple of int
        k of the weighted k-NN candidates.
    adam_rows : int
        From this many training rows on, the Adam heads (softmax, mlp; their defaults) are candidates too.
    holdout_rows : int
        From this many training rows on, one held-out tenth replaces the folds.
    calibrate : {"temperature", "none"}
        Temperature scaling fitted on the winner's out-of-fold logits (from 50 of them; T in [0.1, 10]).
    class_weight : {None, "balanced"}
        Passed to every candidate; the selection's scores are then weighted too.
    random_state : int or None
        Seed of the folds and of the candidates.

    Attributes
    ----------
    best_ : DenseHead
        The refit winner (LogisticHead, KNNHead, SoftmaxHead or MLPHead).
    winner_ : str
        The winning candidate's name, as in the table.
    cv_results_ : list of dict
        One per candidate, in the order tried: name, kind, params, log_loss, accuracy, correct, n, low, high
        (accuracy's 95% Wilson interval), seconds (of the cross-validation).
    cv_ : dict
        How the rows were split: method, splits, seed, rows.
    temperature_ : float
        Divides the winner's logits (1.0 when not calibrated).
    classes_, n_features_in_, history_
        The winner's.

    Examples
    --------
    >>> import numpy as np, headstart as hs
    >>> X, y = np.random.default_rng(0).normal(size=(40, 8)), np.repeat(["cat", "dog"], 20)
    >>> X[y == "dog"] += 2
    >>> head = hs.AutoHead().fit(X, y)
    >>> head.winner_ in [row["name"] for row in head.cv_results_]
    True
    """

    def __init__(self, folds: int = 5, l2_grid: tuple[float, ...] | None = None, neighbors: tuple[int, ...] = (5, 20),
                 adam_rows: int = 5000, holdout_rows: int = 10000, calibrate: str = "temperature",
                 class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.folds = folds
        self.l2_grid = l2_grid
        self.neighbors = neighbors
        self.adam_rows = adam_rows
        self.holdout_rows = holdout_rows
        self.calibrate = calibrate
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, *, X_valid: np.ndarray | None = None,
            y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> AutoHead:
        """Choose on X (n, D), y (n,); X_valid/y_valid are only passed on to the refit winner, for its log."""
        X, y = checked(validate_data, self, X, y, dtype=FLOATS)
        checked(check_classification_targets, y)
        self._check_params()
        self.classes_, yi = np.unique(y, return_inverse=True)
        two_classes(self.classes_)
        X = np.asarray(X, np.float32)
        with threadpool_limits(1, user_api="blas"):  # small products: BLAS's threads cost more than they save
            return self._fit(X, y, yi, X_valid, y_valid, log)

    def _fit(self, X: np.ndarray, y: np.ndarray, yi: np.ndarray, X_valid: np.ndarray | None,
             y_valid: np.ndarray | None, log: EpochLog | None) -> AutoHead:
        folds, self.cv_ = make_folds(yi, self.folds, self.holdout_rows, self.random_state)
        weight = _row_weights(yi, self.class_weight)
        tested = np.concatenate([test for _, test in folds])  # each row once, or the held-out tenth
        self.cv_results_, oof, self._paths = [], [], {}
        t0 = time.perf_counter()
        for name, kind, params, logits, seconds in self._candidates(X, yi, folds, tested, weight):
            loss, accuracy = _scores(yi[tested], logits[tested], weight[tested])
            correct = int(round(accuracy * len(tested)))
            low, high = wilson(correct, len(tested))
            self.cv_results_.append({"name": name, "kind": kind, "params": params, "log_loss": loss,
                                     "accuracy": accuracy, "correct": correct, "n": int(len(tested)),
                                     "low": low, "high": high,
                                     "seconds": round(seconds or time.perf_counter() - t0, 3)})
            oof.append(logits)
            t0 = time.perf_counter()
        best = choose(self.cv_results_, [_row_losses(yi[tested], z[tested], weight[tested]) for z in oof])
        win = self.cv_results_[best]
        self.winner_ = win["name"]
        self.temperature_ = (fit_temperature(oof[best][tested], yi[tested], weight[tested])
                             if self.calibrate == "temperature" and len(tested) >= CALIBRATE_ROWS else 1.0)
        self.best_ = _make(win["kind"], win["params"], self.class_weight, self.random_state)
        if win["kind"] == "logistic":  # the refit starts from the folds' mean solution: the same optimum, sooner
            found = [p.get(win["params"]["l2"]) for p in self._paths[win["params"]["normalize"]]]
            self.best_._init = None if any(t is None for t in found) else np.mean(found, axis=0)
        del self._paths
        self.best_.fit(X, y, X_valid=X_valid, y_valid=y_valid, log=log)
        self.history_ = self.best_.history_
        return self

    def _check_params(self) -> None:
        if self.class_weight not in (None, "balanced"):
            raise UsageError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        if self.calibrate not in ("temperature", "none"):
            raise UsageError(f"calibrate must be 'temperature' or 'none', got {self.calibrate!r}")
        grid = L2_GRID if self.l2_grid is None else self.l2_grid
        if (self.folds < 2 or not grid or min(grid) <= 0 or any(int(k) < 1 for k in self.neighbors)
                or self.adam_rows < 1 or self.holdout_rows < 1):
            raise UsageError(f"AutoHead: need folds >= 2, a grid of l2 > 0, neighbors >= 1, adam_rows and "
                             f"holdout_rows >= 1; got {self.get_params()}")

    def _candidates(self, X: np.ndarray, y: np.ndarray, folds: list, tested: np.ndarray, weight: np.ndarray
                    ) -> Iterator[tuple[str, str, dict, np.ndarray, float | None]]:
        """(name, kind, params, out-of-fold logits (n, C), seconds or None) of every candidate, on the same folds.

        The Adam heads, where they are candidates, train in a thread of their own beside the others (each part
        runs on one core: the products are too small for BLAS's threads); their seconds are their own.
        """
        grid = sorted(L2_GRID if self.l2_grid is None else self.l2_grid, reverse=True)
        k = len(self.classes_)
        adam = len(X) >= self.adam_rows
        worker = ThreadPoolExecutor(1, thread_name_prefix="headstart-auto") if adam and cores() > 1 else None
        try:
            if worker is not None:
                started = worker.submit(self._adam_logits, X, y, folds, k)
            yield from self._linear_and_knn(X, y, folds, tested, weight, grid, k)
            if adam:
                yield from (started.result() if worker is not None else self._adam_logits(X, y, folds, k))
        finally:
            if worker is not None:
                worker.shutdown(wait=False, cancel_futures=True)

    def _adam_logits(self, X: np.ndarray, y: np.ndarray, folds: list, k: int) -> list[tuple]:
        """The Adam candidates' rows of the table: softmax and mlp, their defaults."""
        out = []
        for kind in ("softmax", "mlp"):
            t0 = time.perf_counter()
            logits = np.zeros((len(X), k), np.float32)
            for tr, te in folds:
                logits[te] = _fold_logits(_make(kind, {}, self.class_weight, self.random_state), X, y, tr, te, k)
            out.append((f"{kind} (defaults)", kind, {}, logits, time.perf_counter() - t0))
        return out

    def _linear_and_knn(self, X: np.ndarray, y: np.ndarray, folds: list, tested: np.ndarray, weight: np.ndarray,
                        grid: list[float], k: int) -> Iterator[tuple[str, str, dict, np.ndarray, None]]:
        """The logistic paths' and the k-NN candidates' rows of the table."""
        for normalize in (False, True):
            scaled = grid  # unit rows are fitted at a standardized row's length (LogisticHead), so one grid
            paths = [LogisticPath(X[tr], y[tr], X[te], k, normalize, self.class_weight) for tr, te in folds]
            self._paths[normalize] = [p.solutions for p in paths]  # not their features: pool5's are large
            best, worse = np.inf, 0
            for l2 in scaled:
                logits = np.zeros((len(X), k), np.float32)
                for (_, te), path in zip(folds, paths, strict=True):
                    logits[te] = path.next(l2)
                params = {"l2": float(l2), "standardize": not normalize, "normalize": normalize}
                name = f"logistic l2={l2:.3g} {'normalized' if normalize else 'standardized'}"
                yield name, "logistic", params, logits, None
                # The out-of-fold loss along the path falls, then rises: a rise past its least ends the path.
                loss = _scores(y[tested], logits[tested], weight[tested])[0]
                best, worse = min(best, loss), (worse + 1 if loss > best else 0)
                if worse >= 1:
                    break
        unit, ks, ref = l2_normalize(X), sorted({int(n) for n in self.neighbors}), KNNHead()
        knn = {n: np.zeros((len(X), k), np.float32) for n in ks}
        for tr, te in folds:  # each fold's similarities once, for every k
            w, base = _vote_weights(y[tr], k, self.class_weight), unit[tr].T
            for i in range(0, len(te), QUERY_ROWS):
                rows = te[i:i + QUERY_ROWS]
                sims = unit[rows] @ base
                top = nearest(sims, ks[-1])  # one search for every k
                for n in ks:
                    knn[n][rows] = knn_log_proba(sims, y[tr], n, ref.tau, ref.alpha, w, top)
        for n in ks:
            yield f"knn k={n}", "knn", {"n_neighbors": n}, knn[n], None

    def logits(self, X: np.ndarray) -> np.ndarray:
        """The winner's logits (n, n_classes), divided by the temperature."""
        check_is_fitted(self)
        return self.best_.logits(X) / np.float32(self.temperature_)

    def table(self) -> list[dict]:
        """The candidates' CV scores as rows to print, the winner marked: accuracy with its 95% interval."""
        check_is_fitted(self)
        return [{"candidate": r["name"], "cv_log_loss": round(r["log_loss"], 4),
                 "cv_accuracy": f"{r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}]",
                 "chosen": "<-" if r["name"] == self.winner_ else ""} for r in self.cv_results_]


class LogisticPath:
    """L-BFGS logistic regression on one fold along a path of penalties, strongest first, each fit started from
    the previous one's solution: `next(l2)` gives the test rows' logits (n_test, k). Standardized by the training
    rows' own statistics, or L2-normalized (and then not standardized: the linear probe of CLIP and DINOv2)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, k: int, normalize: bool,
                 class_weight: str | None) -> None:
        if normalize:  # at the length of a standardized row, as LogisticHead fits them
            length = np.float32(np.sqrt(X.shape[1]))
            self.Z, self.Z_test = l2_normalize(X) * length, l2_normalize(X_test) * length
        else:
            mean, std = X.mean(0), X.std(0)
            std[std < 1e-6] = 1.0
            self.Z, self.Z_test = (X - mean) / std, (X_test - mean) / std
        self.k, self.present, self.theta, self.solutions = k, np.unique(y), None, {}
        self.index = np.searchsorted(self.present, y)  # the fold's own classes, mapped back to all k
        self.weight = _row_weights(self.index, class_weight)

    def next(self, l2: float) -> np.ndarray:
        if len(self.present) < 2:
            return _constant_logits(len(self.Z_test), self.k, self.present)
        self.theta, _ = fit_logistic(self.Z, self.index, len(self.present), l2, self.weight, init=self.theta,
                                     max_iter=PATH_ITER, tol=PATH_TOL)
        if len(self.present) == self.k:
            self.solutions[l2] = self.theta
        return _full_logits(logits_of(self.theta, self.Z_test, len(self.present)), self.present, self.k)


def _make(kind: str, params: dict, class_weight: str | None, seed: int | None) -> DenseHead:
    cls = {"logistic": LogisticHead, "knn": KNNHead, "softmax": SoftmaxHead, "mlp": MLPHead}[kind]
    return cls(**params, class_weight=class_weight, random_state=seed)


def cross_val_logits(make: Callable[[], DenseHead], X: np.ndarray, y: np.ndarray, folds: list) -> np.ndarray:
    """Out-of-fold logits (n, k) of the estimators `make()` fitted on each fold's training rows (class indices y);
    rows in no fold's test part stay 0."""
    k = int(y.max()) + 1
    logits = np.zeros((len(X), k), np.float32)
    for tr, te in folds:
        logits[te] = _fold_logits(make(), X, y, tr, te, k)
    return logits


def oof_scores(y: np.ndarray, logits: np.ndarray, folds: list) -> tuple[float, float]:
    """(log loss, accuracy) over the rows of the folds' test parts."""
    tested = np.concatenate([te for _, te in folds])
    return _scores(y[tested], logits[tested], np.ones(len(tested)))


def _fold_logits(head: DenseHead, X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, k: int
                 ) -> np.ndarray:
    present = np.unique(y[tr])
    if len(present) < 2:
        return _constant_logits(len(te), k, present)
    head.fit(X[tr], y[tr])
    return _full_logits(head.logits(X[te]), head.classes_, k)


def _full_logits(z: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """Logits over all k classes from a model that saw only `classes`: the others far below the row's least."""
    if len(classes) == k:
        return z.astype(np.float32)
    out = np.repeat(z.min(1, keepdims=True) - 20.0, k, axis=1)
    out[:, classes] = z
    return out.astype(np.float32)


def _constant_logits(n: int, k: int, present: np.ndarray) -> np.ndarray:
    out = np.full((n, k), -20.0, np.float32)
    out[:, present] = 0.0
    return out


def _row_weights(y: np.ndarray, class_weight: str | None) -> np.ndarray:
    if class_weight != "balanced":
        return np.ones(len(y))
    counts = np.bincount(y)
    return len(y) / (len(counts) * counts[y])


def _vote_weights(y: np.ndarray, k: int, class_weight: str | None) -> np.ndarray:
    if class_weight != "balanced":
        return np.ones(k, np.float32)
    counts = np.bincount(y, minlength=k)
    return (len(y) / (k * np.maximum(counts, 1))).astype(np.float32)


def choose(results: list[dict], losses: list[np.ndarray]) -> int:
    """The candidate chosen: the first, in order of preference, whose out-of-fold loss is within one standard
    error of the least (the one-standard-error rule: differences within the noise of a few rows do not count).

    Preference: logistic on normalized rows (strongest penalty first; the best on little data), k-NN, logistic
    on standardized rows (strongest first), the Adam heads. Among exact ties in loss, the higher accuracy."""
    def order(i: int) -> tuple:
        r = results[i]
        group = {"logistic": 2, "knn": 1, "softmax": 3, "mlp": 3}[r["kind"]]
        if r["kind"] == "logistic" and r["params"]["normalize"]:
            group = 0
        return group, -r["params"].get("l2", 0.0), i
    least = min(range(len(results)), key=lambda i: (results[i]["log_loss"], -results[i]["accuracy"], i))
    for i in sorted(range(len(results)), key=order):
        diff = losses[i] - losses[least]
        if diff.mean() <= diff.std() / np.sqrt(len(diff)):
            return i
    return least


def _row_losses(y: np.ndarray, logits: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Each out-of-fold row's log loss, times its weight over the mean weight."""
    logp = log_softmax(logits.astype(np.float64), axis=1)
    return -logp[np.arange(len(y)), y] * weight / weight.mean()


def _scores(y: np.ndarray, logits: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """(weighted mean log loss, weighted accuracy) of out-of-fold logits."""
    logp = log_softmax(logits.astype(np.float64), axis=1)
    loss = float(-(logp[np.arange(len(y)), y] * weight).sum() / weight.sum())
    return loss, float(((logits.argmax(1) == y) * weight).sum() / weight.sum())


