"""Replacement heads for a frozen body, in scikit-learn style: `fit(X, y)`, `predict_proba(X)`.

Every fitted head ends as the same plain form, which is what gets saved and bundled into ONNX:
standardize (mean_, scale_), then dense layers `layers_` [(W (D_in, D_out), b)] with ReLU between them,
then softmax over the classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

EpochLog = Callable[[dict], None]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check(X: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    X = np.asarray(X)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"X must be a 2-D float array (n_samples, n_features), got {X.dtype} {X.shape}")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (X.shape[0],) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise ValueError(f"y must be (n_samples,) = ({X.shape[0]},) class indices >= 0, got {y.dtype} {y.shape}")
    return X, y


class Head:
    """Shared inference and bookkeeping; subclasses implement `_fit`."""

    n_classes_: int
    mean_: np.ndarray
    scale_: np.ndarray
    layers_: list[tuple[np.ndarray, np.ndarray]]
    history_: list[dict]

    def __init__(self, standardize: bool = True, class_weight: str | None = None, seed: int = 0) -> None:
        if class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
        self.standardize = standardize
        self.class_weight = class_weight
        self.seed = seed

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
            std = np.sqrt(np.maximum(ss / len(X) - mean**2, 0))
            self.mean_, self.scale_ = mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)
        else:
            self.mean_, self.scale_ = np.zeros(d, np.float32), np.ones(d, np.float32)

    def _sample_weight(self, y: np.ndarray) -> np.ndarray:
        if self.class_weight != "balanced":
            return np.ones(len(y), np.float32)
        counts = np.bincount(y, minlength=self.n_classes_).astype(np.float64)
        w = len(y) / (self.n_classes_ * np.maximum(counts, 1))
        return w[y].astype(np.float32)

    def fit(self, X: np.ndarray, y: np.ndarray, X_valid: np.ndarray | None = None, y_valid: np.ndarray | None = None,
            log: EpochLog | None = None, n_classes: int | None = None) -> Head:
        """Fit on X (n, D) float, y (n,) class indices; X_valid/y_valid are only scored, for the epoch log."""
        X, y = _check(X, y)
        self.n_classes_ = int(n_classes or y.max() + 1)
        if self.n_classes_ < 2:
            raise ValueError(f"need at least 2 classes to train a head, got {self.n_classes_}")
        self._stats(X)
        self.history_ = []
        self._fit(X, y, X_valid, y_valid, log or (lambda _: None))
        return self

    def decision_function(self, X: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Logits (n, n_classes)."""
        X, _ = _check(X)
        out = np.empty((len(X), self.n_classes_), np.float32)
        for i in range(0, len(X), batch):
            h = (X[i:i + batch].astype(np.float32) - self.mean_) / self.scale_
            for j, (W, b) in enumerate(self.layers_):
                h = h @ W + b
                if j < len(self.layers_) - 1:
                    h = np.maximum(h, 0)
            out[i:i + batch] = h
        return out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, n_classes)."""
        return softmax(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.decision_function(X).argmax(axis=1)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())

    def _loss_acc(self, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        p = self.predict_proba(X)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()), float((p.argmax(1) == y).mean())

    def _log(self, log: EpochLog, epoch: int, ms: float, train: tuple[float, float], X_valid, y_valid,
             **extra: object) -> None:
        rec = {"epoch": epoch, "ms": round(ms, 2), "train_loss": train[0], "train_accuracy": train[1], **extra}
        if X_valid is not None and len(X_valid):
            rec["valid_loss"], rec["valid_accuracy"] = self._loss_acc(X_valid, y_valid)
        self.history_.append(rec)
        log(rec)


class MLPHead(Head):
    """Hidden Dense+ReLU+dropout layers, then Dense(n_classes) with softmax, trained by minibatch Adam.

    `hidden=()` is the classic replacement head, Dense(n_classes, softmax) on frozen features.
    """

    def __init__(self, hidden: tuple[int, ...] = (256,), dropout: float = 0.5, epochs: int = 20, lr: float = 1e-3,
                 batch_size: int = 64, l2: float = 1e-4, standardize: bool = True, class_weight: str | None = None,
                 seed: int = 0) -> None:
        super().__init__(standardize, class_weight, seed)
        if not 0 <= dropout < 1 or epochs < 1 or lr <= 0 or batch_size < 1 or l2 < 0:
            raise ValueError("need 0 <= dropout < 1, epochs >= 1, lr > 0, batch_size >= 1, l2 >= 0")
        self.hidden, self.dropout, self.epochs, self.lr = tuple(hidden), dropout, epochs, lr
        self.batch_size, self.l2 = batch_size, l2

    def _fit(self, X, y, X_valid, y_valid, log: EpochLog) -> None:
        rng = np.random.default_rng(self.seed)
        sizes = [X.shape[1], *self.hidden, self.n_classes_]
        self.layers_ = [((rng.standard_normal((a, b)) * np.sqrt((2.0 if i < len(sizes) - 2 else 1.0) / a))
                         .astype(np.float32), np.zeros(b, np.float32))
                        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
        params = [p for layer in self.layers_ for p in layer]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        scratch = [np.empty_like(p) for p in params]
        sw = self._sample_weight(y)
        onehot = np.eye(self.n_classes_, dtype=np.float32)
        step, b1, b2 = 0, 0.9, 0.999
        for epoch in range(1, self.epochs + 1):
            t0 = time.perf_counter()
            order = rng.permutation(len(X))
            loss_sum = correct = 0.0
            for i in range(0, len(X), self.batch_size):
                idx = np.sort(order[i:i + self.batch_size])  # sorted rows gather faster from memory
                h = (X[idx].astype(np.float32) - self.mean_) / self.scale_
                acts, masks = [h], []
                for W, b in self.layers_[:-1]:
                    h = np.maximum(h @ W + b, 0)
                    if self.dropout:
                        mask = (rng.random(h.shape, dtype=np.float32) >= self.dropout) / (1 - self.dropout)
                        h = h * mask
                        masks.append(mask)
                    acts.append(h)
                W, b = self.layers_[-1]
                p = softmax(h @ W + b)
                yb = y[idx]
                # Running training loss and accuracy over the epoch, as Keras reports them.
                loss_sum += float(-np.log(np.clip(p[np.arange(len(idx)), yb], 1e-12, None)).sum())
                correct += float((p.argmax(1) == yb).sum())
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
            self._log(log, epoch, ms, (loss_sum / len(X), correct / len(X)), X_valid, y_valid)


class SoftmaxHead(MLPHead):
    """Multinomial logistic regression by minibatch gradient descent: Keras' Dense(n_classes, softmax)."""

    def __init__(self, epochs: int = 20, lr: float = 1e-3, batch_size: int = 64, l2: float = 1e-4,
                 standardize: bool = True, class_weight: str | None = None, seed: int = 0) -> None:
        super().__init__((), 0.0, epochs, lr, batch_size, l2, standardize, class_weight, seed)


class LogisticHead(Head):
    """scikit-learn's LogisticRegression (lbfgs, the exact optimum): binary, or multinomial for more classes.

    `l2` is the penalty on the mean loss, so C = 1 / (l2 * n_samples), comparable with the other heads.
    """

    def __init__(self, l2: float = 1e-2, max_iter: int = 2000, standardize: bool = True,
                 class_weight: str | None = None, seed: int = 0) -> None:
        super().__init__(standardize, class_weight, seed)
        if l2 <= 0:
            raise ValueError(f"l2 must be > 0 for the logistic head, got {l2}")
        self.l2, self.max_iter = l2, max_iter

    def _fit(self, X, y, X_valid, y_valid, log: EpochLog) -> None:
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        Z = (X.astype(np.float32) - self.mean_) / self.scale_
        model = LogisticRegression(C=1.0 / (self.l2 * len(X)), max_iter=self.max_iter,
                                   class_weight=self.class_weight, random_state=self.seed)
        model.fit(Z, y)
        if set(model.classes_) != set(range(self.n_classes_)):
            raise ValueError(f"the training rows hold classes {list(model.classes_)}, "
                             f"expected every one of 0..{self.n_classes_ - 1}")
        coef, intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
        if self.n_classes_ == 2:  # sigmoid(z) == softmax([0, z])[1]
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.array([0.0, intercept[0]], np.float32)
        self.layers_ = [(np.ascontiguousarray(coef.T), intercept)]
        ms = (time.perf_counter() - t0) * 1000
        self._log(log, 1, ms, self._loss_acc(X, y), X_valid, y_valid, iterations=int(np.max(model.n_iter_)))


KINDS = {"softmax": SoftmaxHead, "logistic": LogisticHead, "mlp": MLPHead}
