"""Replacement heads for a frozen body, as scikit-learn estimators: `fit(X, y)`, `predict_proba(X)`, `score`.

Every fitted head ends as the same plain form, which is what gets saved and bundled into ONNX: standardize
(`mean_`, `scale_`), then dense layers `layers_` [(W (D_in, D_out), b)] with ReLU between them, then softmax
over `classes_`. They know nothing of where features come from: X is any (n_samples, n_features) float array.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .metrics import loss_and_accuracy

EpochLog = Callable[[dict], None]
# float16 features stay float16 (pool5 at 224 px is 1.25 GB per 25,000 images); blocks are widened as used.
FLOATS = [np.float32, np.float64, np.float16]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class DenseHead(ClassifierMixin, BaseEstimator):
    """What every head shares once fitted: inference, bookkeeping and the epoch log. Subclasses implement `_fit`.

    Fitted attributes: `classes_` (k,), `n_features_in_`, `mean_`/`scale_` (D,), `layers_`, `history_`
    (one dict per epoch: train and valid loss and accuracy, milliseconds).
    """

    def fit(self, X: np.ndarray, y: np.ndarray, *, X_valid: np.ndarray | None = None,
            y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> DenseHead:
        """Fit on X (n, D) float and y (n,) labels of any kind; X_valid/y_valid are only scored, for the log."""
        X, y = validate_data(self, X, y, dtype=FLOATS)
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least 2 classes to train a head, got {len(self.classes_)}: "
                             f"{self.classes_.tolist()}")
        valid = None
        if X_valid is not None and len(X_valid):
            X_valid = validate_data(self, X_valid, reset=False, dtype=FLOATS)
            valid = (X_valid, self._encode(np.asarray(y_valid), "validation"))
        self._check_params()
        self._stats(X)
        self.history_ = []
        self._fit(X, y_index, valid, log or (lambda _: None))
        return self

    def _check_params(self) -> None:
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")

    def _encode(self, y: np.ndarray, what: str) -> np.ndarray:
        """Class indices of labels `y`; a label the head was not trained on is an error naming it."""
        unknown = sorted(set(np.unique(y).tolist()) - set(self.classes_.tolist()))
        if unknown:
            raise ValueError(f"the {what} labels hold {unknown}, which the training labels "
                             f"({self.classes_.tolist()}) do not have")
        return np.searchsorted(self.classes_, y)

    def _stats(self, X: np.ndarray) -> None:
        d = X.shape[1]
        if self.standardize:
            # In float64 blocks: float16 features summed in float16 overflow and lose precision.
            s, ss = np.zeros(d), np.zeros(d)
            for i in range(0, len(X), 4096):
                b = X[i:i + 4096].astype(np.float64)
                s += b.sum(0)
                ss += (b * b).sum(0)
            mean = s / len(X)
            self._set_stats(mean, np.sqrt(np.maximum(ss / len(X) - mean**2, 0)))
        else:
            self._set_stats(np.zeros(d), np.ones(d))

    def _set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        if not self.standardize:
            mean, std = np.zeros_like(mean), np.ones_like(std)
        self.mean_, self.scale_ = mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)

    def _sample_weight(self, y_index: np.ndarray) -> np.ndarray:
        return compute_sample_weight(self.class_weight, y_index).astype(np.float32)

    def _logits(self, X: np.ndarray, batch: int = 4096) -> np.ndarray:
        out = np.empty((len(X), len(self.classes_)), np.float32)
        for i in range(0, len(X), batch):
            h = (X[i:i + batch].astype(np.float32) - self.mean_) / self.scale_
            for j, (W, b) in enumerate(self.layers_):
                h = h @ W + b
                if j < len(self.layers_) - 1:
                    h = np.maximum(h, 0)
            out[i:i + batch] = h
        return out

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits (n, n_classes)."""
        check_is_fitted(self)
        return self._logits(validate_data(self, X, reset=False, dtype=FLOATS))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in the order of `classes_`."""
        return softmax(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Labels (n,), from `classes_`."""
        index = self.decision_function(X).argmax(axis=1)
        return self.classes_[index]

    def _log(self, log: EpochLog, epoch: int, ms: float, train: tuple[float, float],
             valid: tuple[np.ndarray, np.ndarray] | None, **extra: object) -> None:
        rec = {"epoch": epoch, "ms": round(ms, 2), "train_loss": train[0], "train_accuracy": train[1], **extra}
        if valid is not None:
            rec["valid_loss"], rec["valid_accuracy"] = loss_and_accuracy(valid[1], softmax(self._logits(valid[0])))
        self.history_.append(rec)
        log(rec)


class _AdamHead(DenseHead):
    """Dense layers trained by minibatch Adam on the mean cross-entropy plus `l2` times the weights' squares."""

    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def _check_params(self) -> None:
        super()._check_params()
        if not (all(int(h) >= 1 for h in self.hidden) and 0 <= self.dropout < 1 and self.epochs >= 1
                and self.lr > 0 and self.batch_size >= 1 and self.l2 >= 0):
            raise ValueError(f"{type(self).__name__}: need hidden sizes >= 1, 0 <= dropout < 1, epochs >= 1, "
                             f"lr > 0, batch_size >= 1, l2 >= 0; got {self.get_params()}")

    def _fit(self, X, y, valid, log: EpochLog) -> None:
        self._train(lambda rng: _shuffled_batches(X, self.batch_size, rng), X.shape[1], y, valid, log)

    def fit_blocks(self, blocks: Callable, n_features: int, y: np.ndarray, *, X_valid: np.ndarray | None = None,
                   y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> _AdamHead:
        """Fit on features too large for memory, read block by block.

        `blocks(rng)` yields (rows, X_rows): positions into y (n,) and their features (len(rows), n_features),
        every row once per call, in an order it shuffles with `rng` (or as stored when rng is None). Each block
        is shuffled again into minibatches; the standardization statistics come from one pass over the blocks.
        """
        y = np.asarray(y)
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least 2 classes to train a head, got {self.classes_.tolist()}")
        self.n_features_in_ = n_features
        valid = None
        if X_valid is not None and len(X_valid):
            valid = (validate_data(self, X_valid, reset=False, dtype=FLOATS), self._encode(y_valid, "validation"))
        self._check_params()
        s, ss, n = np.zeros(n_features), np.zeros(n_features), 0
        for _, block in blocks(None):
            b = block.astype(np.float64)
            s, ss, n = s + b.sum(0), ss + (b * b).sum(0), n + len(b)
        self._set_stats(s / n, np.sqrt(np.maximum(ss / n - (s / n) ** 2, 0)))
        self.history_ = []

        def batches(rng: np.random.Generator):
            for rows, block in blocks(rng):
                order = rng.permutation(len(rows))
                for i in range(0, len(rows), self.batch_size):
                    pick = np.sort(order[i:i + self.batch_size])
                    yield rows[pick], block[pick]

        self._train(batches, n_features, y_index, valid, log or (lambda _: None))
        return self

    def _train(self, batches: Callable, d: int, y: np.ndarray, valid, log: EpochLog) -> None:
        """Epochs of Adam steps over `batches(rng)`: (rows into y, their raw features) per minibatch."""
        rng = np.random.default_rng(self.random_state)
        k = len(self.classes_)
        sizes = [d, *(int(h) for h in self.hidden), k]
        self.layers_ = [((rng.standard_normal((a, b)) * np.sqrt((2.0 if i < len(sizes) - 2 else 1.0) / a))
                         .astype(np.float32), np.zeros(b, np.float32))
                        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
        params = [p for layer in self.layers_ for p in layer]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        scratch = [np.empty_like(p) for p in params]
        sw = self._sample_weight(y)
        onehot = np.eye(k, dtype=np.float32)
        proba = np.empty((len(y), k), np.float32)  # each row's probabilities when its batch was trained on
        inv = 1.0 / self.scale_
        # Reused every step: allocating a pool5 batch anew costs more than computing with it.
        batch = np.empty((self.batch_size, d), np.float32)
        step, b1, b2 = 0, 0.9, 0.999
        for epoch in range(1, self.epochs + 1):
            t0 = time.perf_counter()
            for idx, raw in batches(rng):
                h = batch[:len(idx)]
                np.copyto(h, raw, casting="unsafe")  # float16 -> float32
                h -= self.mean_
                h *= inv
                z = h @ self.layers_[0][0] + self.layers_[0][1]
                acts, masks = [h], []
                for W, b in self.layers_[1:]:
                    h = np.maximum(z, 0)
                    if self.dropout:
                        mask = (rng.random(h.shape, dtype=np.float32) >= self.dropout) / (1 - self.dropout)
                        h = h * mask
                        masks.append(mask)
                    acts.append(h)
                    z = h @ W + b
                p = softmax(z)
                proba[idx] = p
                yb = y[idx]
                g = (p - onehot[yb]) * (sw[idx] / sw[idx].sum())[:, None]  # d(weighted mean CE)/d(logits)
                grads = []
                for j in range(len(self.layers_) - 1, -1, -1):
                    W, b = self.layers_[j]
                    grads = [acts[j].T @ g + self.l2 * W, g.sum(0)] + grads
                    if j:
                        g = (g @ W.T) * (acts[j] > 0)
                        if self.dropout:
                            g *= masks[j - 1]
                step += 1
                lr = self.lr * np.sqrt(1 - b2**step) / (1 - b1**step)
                for p_, gr, mm, vv, tmp in zip(params, grads, m, v, scratch, strict=True):
                    # In place: for a pool5 MLP these are 6.4M-element arrays, updated every step.
                    mm *= b1
                    mm += np.multiply(gr, 1 - b1, out=tmp)
                    vv *= b2
                    np.multiply(gr, gr, out=tmp)
                    tmp *= 1 - b2
                    vv += tmp
                    np.sqrt(vv, out=tmp)
                    tmp += 1e-7
                    np.divide(mm, tmp, out=tmp)
                    tmp *= lr
                    p_ -= tmp
            ms = (time.perf_counter() - t0) * 1000
            # Running training loss and accuracy over the epoch, as Keras reports them.
            self._log(log, epoch, ms, loss_and_accuracy(y, proba), valid)


def _shuffled_batches(X: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Minibatches of an in-memory X in a fresh random order: (rows, X[rows]), one buffer reused."""
    order = rng.permutation(len(X))
    raw = np.empty((batch_size, X.shape[1]), X.dtype)
    for i in range(0, len(X), batch_size):
        idx = np.sort(order[i:i + batch_size])  # sorted rows gather faster from memory
        yield idx, np.take(X, idx, axis=0, out=raw[:len(idx)])


class MLPHead(_AdamHead):
    """Hidden Dense+ReLU+dropout layers, then Dense(n_classes) with softmax, trained by minibatch Adam."""

    def __init__(self, hidden: tuple[int, ...] = (256,), dropout: float = 0.5, epochs: int = 20, lr: float = 1e-3,
                 batch_size: int = 64, l2: float = 1e-4, standardize: bool = True, class_weight: str | None = None,
                 random_state: int | None = 0) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.l2 = l2
        self.standardize = standardize
        self.class_weight = class_weight
        self.random_state = random_state


class SoftmaxHead(_AdamHead):
    """Multinomial logistic regression by minibatch Adam: Keras' Dense(n_classes, softmax) on frozen features."""

    def __init__(self, epochs: int = 20, lr: float = 1e-3, batch_size: int = 64, l2: float = 1e-4,
                 standardize: bool = True, class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.l2 = l2
        self.standardize = standardize
        self.class_weight = class_weight
        self.random_state = random_state


class LogisticHead(DenseHead):
    """scikit-learn's LogisticRegression (lbfgs, the exact optimum): binary, or multinomial for more classes.

    `l2` is the penalty on the mean loss, so C = 1 / (l2 * n_samples), comparable with the other heads.
    """

    def __init__(self, l2: float = 1e-2, max_iter: int = 2000, standardize: bool = True,
                 class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.l2 = l2
        self.max_iter = max_iter
        self.standardize = standardize
        self.class_weight = class_weight
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        if self.l2 <= 0 or self.max_iter < 1:
            raise ValueError(f"LogisticHead: need l2 > 0 and max_iter >= 1; got l2={self.l2}, "
                             f"max_iter={self.max_iter}")

    def _fit(self, X, y, valid, log: EpochLog) -> None:
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        Z = (X.astype(np.float32) - self.mean_) / self.scale_
        model = LogisticRegression(C=1.0 / (self.l2 * len(X)), max_iter=self.max_iter,
                                   class_weight=self.class_weight, random_state=self.random_state)
        model.fit(Z, y)
        coef, intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
        if len(self.classes_) == 2:  # sigmoid(z) == softmax([0, z])[1]
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]], np.float32)
        self.layers_ = [(np.ascontiguousarray(coef.T), intercept)]
        ms = (time.perf_counter() - t0) * 1000
        self._log(log, 1, ms, loss_and_accuracy(y, softmax(self._logits(X))), valid,
                  iterations=int(np.max(model.n_iter_)))


KINDS: dict[str, type[DenseHead]] = {"softmax": SoftmaxHead, "logistic": LogisticHead, "mlp": MLPHead}
