"""What every fitted head shares: the plain form that gets saved and bundled, and its inference.

Standardize (`mean_`, `scale_`), then dense layers `layers_` [(W (D_in, D_out), b)] with ReLU between them, then
softmax over `classes_`. Heads know nothing of where features come from: X is any (n_samples, n_features) float
array.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from headstart.export.errors import DataError, HeadstartError, UsageError

from .calibration import CALIBRATIONS
from .compute import mean_std, rows_per_block
from .metrics import loss_and_accuracy

EpochLog = Callable[[dict], None]
T = TypeVar("T")
# float16 features stay float16 (pool5 at 224 px is 1.25 GB per 25,000 images); blocks are widened as used.
FLOATS = [np.float32, np.float64, np.float16]
# The smallest row length l2_normalize divides by (the bundle's graph divides by the same).
NORM_EPS = 1e-12


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows (n, D) scaled to unit length, as float32; an all-zero row stays zero."""
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), NORM_EPS)


def standardization(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`mean_`, `scale_` (float32) from the training rows' per-feature mean and standard deviation: a constant
    feature is divided by 1. NaN or infinite statistics (from such values in the rows) are a DataError."""
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std)))
    if len(bad):
        raise DataError(f"the training features hold NaN or infinite values (or values beyond float32's range) "
                         f"in {len(bad)} of {len(mean)} columns (first: {bad[:5].tolist()}); remove or repair "
                         "the rows that hold them")
    return mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def dense_outputs(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, layers: list, normalize: bool = False
                  ) -> np.ndarray:
    """The last dense layer's outputs (n, D_out) float32: (L2-normalize rows,) standardize, the layers with ReLU
    between them; block by block, so float16 X is widened a block at a time. What heads.tuned.dense_nodes builds."""
    out = np.empty((len(X), layers[-1][0].shape[1]), np.float32)
    batch = rows_per_block(X.shape[1], 4)
    for i in range(0, len(X), batch):
        h = X[i:i + batch].astype(np.float32)
        if normalize:
            h = l2_normalize(h)
        h = (h - mean) / scale
        for j, (W, b) in enumerate(layers):
            h = h @ W + b
            if j < len(layers) - 1:
                h = np.maximum(h, 0)
        out[i:i + batch] = h
    return out


def softmax(z: np.ndarray, flush: float | None = None) -> np.ndarray:
    """Row-wise softmax of (n, k) logits; `flush`: probabilities below exp(flush) times the largest become 0."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    if flush is not None:
        e[z < flush] = 0
    return e / e.sum(axis=1, keepdims=True)


def margins(z: np.ndarray) -> np.ndarray:
    """Decision values as scikit-learn has them: logits (n, k), or for k = 2 the second's margin (n,)."""
    return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z


def checked(call: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`call(*args, **kwargs)`, scikit-learn's own input checks among them, its ValueErrors about the data given
    raised as DataError (a ValueError too, with the same message)."""
    try:
        return call(*args, **kwargs)
    except ValueError as e:
        if isinstance(e, HeadstartError):
            raise
        raise DataError(str(e)) from e


def two_classes(classes: np.ndarray) -> None:
    """Refuse training labels of fewer than 2 classes."""
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes to train a head, got {len(classes)} class"
                        f"{'es' if len(classes) != 1 else ''}: {classes.tolist()}")


class FromLogits(ClassifierMixin):
    """scikit-learn's classifier methods, all from one `logits(X)` (n, n_classes) that a head defines."""

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """scikit-learn's decision values: the logits (n, n_classes), or for 2 classes the margin of the second
        class over the first, (n,)."""
        return margins(self.logits(X))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in the order of `classes_`."""
        return softmax(self.logits(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Labels (n,), from `classes_`."""
        index = self.logits(X).argmax(axis=1)  # first: an unfitted head raises NotFittedError
        return self.classes_[index]


class DenseHead(FromLogits, BaseEstimator):
    """What every head shares once fitted: inference, bookkeeping and the epoch log. Subclasses implement `_fit`.

    Fitted attributes: `classes_` (k,), `n_features_in_`, `mean_`/`scale_` (D,), `layers_`, `history_`
    (one dict per epoch: train and valid loss and accuracy, milliseconds), `temperature_` (divides the logits;
    1.0 uncalibrated) and `calibration_` (how it was fitted: method, rows, temperature; None uncalibrated).
    """

    def fit(self, X: np.ndarray, y: np.ndarray, *, X_valid: np.ndarray | None = None,
            y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> DenseHead:
        """Fit on X (n, D) float and y (n,) labels of any kind; X_valid/y_valid are only scored, for the log."""
        # Finiteness comes free with the standardization statistics (see _set_stats), sparing sklearn's own pass.
        X, y = checked(validate_data, self, X, y, dtype=FLOATS, ensure_all_finite=not self.standardize)
        y_index, valid = self._begin(y, X_valid, y_valid)
        self._stats(X)
        self._fit(X, y_index, valid, log or (lambda _: None))
        return self

    def _begin(self, y: np.ndarray, X_valid: np.ndarray | None, y_valid: np.ndarray | None
               ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """What every fit does first: the classes, the validation rows, the parameters checked, a fresh history.

        Returns the training rows' class indices and (X_valid, their class indices) or None.
        """
        checked(check_classification_targets, y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        two_classes(self.classes_)
        valid = None
        if X_valid is not None and len(X_valid):
            X_valid = checked(validate_data, self, X_valid, reset=False, dtype=FLOATS)
            valid = (X_valid, self._encode(np.asarray(y_valid), "validation"))
        self._check_params()
        self.history_, self.temperature_, self.calibration_ = [], 1.0, None
        return y_index, valid

    def _check_params(self) -> None:
        if self.class_weight not in (None, "balanced"):
            raise UsageError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        if getattr(self, "calibrate", "none") not in CALIBRATIONS:
            raise UsageError(f"calibrate must be 'temperature' or 'none', got {self.calibrate!r}")

    def _encode(self, y: np.ndarray, what: str) -> np.ndarray:
        """Class indices of labels `y`; a label the head was not trained on is an error naming it."""
        unknown = sorted(set(np.unique(y).tolist()) - set(self.classes_.tolist()))
        if unknown:
            raise DataError(f"the {what} labels hold {unknown}, which the training labels "
                             f"({self.classes_.tolist()}) do not have")
        return np.searchsorted(self.classes_, y)

    def _stats(self, X: np.ndarray) -> None:
        d = X.shape[1]
        if self.standardize and getattr(self, "normalize", False):
            self._set_stats(*mean_std([l2_normalize(X)], d))
        elif self.standardize:
            self._set_stats(*mean_std([X], d))
        else:
            self._set_stats(np.zeros(d), np.ones(d))

    def _set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        mean_, scale_ = standardization(mean, std)  # checked even unstandardized: finiteness comes from it
        self.mean_, self.scale_ = (mean_, scale_) if self.standardize else (np.zeros_like(mean_), np.ones_like(scale_))

    def _sample_weight(self, y_index: np.ndarray) -> np.ndarray:
        return compute_sample_weight(self.class_weight, y_index).astype(np.float32)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return dense_outputs(X, self.mean_, self.scale_, self.layers_, bool(getattr(self, "normalize", False)))

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Logits (n, n_classes), divided by the temperature, whose softmax is `predict_proba`: what the bundled
        graph computes."""
        check_is_fitted(self)
        z = self._logits(checked(validate_data, self, X, reset=False, dtype=FLOATS))
        t = getattr(self, "temperature_", 1.0)
        return z if t == 1.0 else z / np.float32(t)


    def _log(self, log: EpochLog, epoch: int, ms: float, train: tuple[float, float],
             valid: tuple[np.ndarray, np.ndarray] | None, **extra: object) -> None:
        rec = {"epoch": epoch, "ms": round(ms, 2), "train_loss": train[0], "train_accuracy": train[1], **extra}
        if valid is not None:
            rec["valid_loss"], rec["valid_accuracy"] = loss_and_accuracy(valid[1], softmax(self._logits(valid[0])))
        self.history_.append(rec)
        log(rec)
