"""Replacement heads for a frozen body, as scikit-learn estimators: `fit(X, y)`, `predict_proba(X)`, `score`.

The Adam heads (`SoftmaxHead`, `MLPHead`) and `LogisticHead` (L-BFGS, heads.linear). The Adam heads' training
loop is `training.AdamTraining` and their optimizer `optimizers.Adam`; the fitted form they share (`DenseHead`,
`softmax`, `l2_normalize`) is in `base`, importable from here as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from sklearn.base import clone
from threadpoolctl import threadpool_limits

from headstart.export.errors import UsageError

from .base import FLOATS, NORM_EPS, DenseHead, EpochLog, l2_normalize, softmax
from .calibration import CALIBRATE_ROWS, calibrate, make_folds
from .compute import mean_std
from .metrics import loss_and_accuracy
from .training import AdamTraining, InMemory, Streamed, hash_folds, passes_per_epoch

__all__ = ["FLOATS", "NORM_EPS", "DenseHead", "EpochLog", "LogisticHead", "MLPHead", "SoftmaxHead", "l2_normalize",
           "softmax"]


class _AdamHead(DenseHead):
    """Dense layers trained by minibatch Adam on the mean cross-entropy plus `l2` times the weights' squares.

    Training runs `epochs` epochs of at least `min_steps` Adam steps in all: on small data an epoch makes several
    passes over the rows, so 8 rows and 80,000 rows both converge. With `patience`, a `validation_fraction` of the
    training rows, chosen by each row's content hash, is held out: training stops once their loss has not fallen
    for `patience` epochs, and the best epoch's weights are kept.
    """

    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def _check_params(self) -> None:
        super()._check_params()
        if not (all(int(h) >= 1 for h in self.hidden) and 0 <= self.dropout < 1 and self.epochs >= 1
                and self.lr > 0 and self.batch_size >= 1 and self.l2 >= 0 and self.min_steps >= 0
                and (self.patience is None or self.patience >= 1) and 0 < self.validation_fraction < 1):
            raise UsageError(f"{type(self).__name__}: need hidden sizes >= 1, 0 <= dropout < 1, epochs >= 1, "
                             f"lr > 0, batch_size >= 1, l2 >= 0, min_steps >= 0, patience None or >= 1, "
                             f"0 < validation_fraction < 1; got {self.get_params()}")

    def _fit(self, X: np.ndarray, y: np.ndarray, valid: tuple | None, log: EpochLog) -> None:
        self._train(InMemory(X), X.shape[1], y, valid, log)

    def fit_blocks(self, blocks: Callable, n_features: int, y: np.ndarray, *, X_valid: np.ndarray | None = None,
                   y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> _AdamHead:
        """Fit on features too large for memory, read block by block.

        `blocks(rng)` yields (rows, X_rows): positions into y (n,) and their features (len(rows), n_features),
        every row once per call, in an order it shuffles with `rng` (or as stored when rng is None). Each block
        is shuffled again into minibatches; the standardization statistics come from one pass over the blocks.
        Held-out rows (`patience`, `calibrate`) are read into memory.
        """
        self.n_features_in_ = n_features
        y_index, valid = self._begin(np.asarray(y), X_valid, y_valid)
        source = Streamed(blocks, n_features)
        self._set_stats(*mean_std(source.stat_blocks(), n_features))
        self._train(source, n_features, y_index, valid, log or (lambda _: None))
        return self

    def _train(self, source: InMemory | Streamed, d: int, y: np.ndarray, valid: tuple | None, log: EpochLog
               ) -> None:
        """Hold rows out where needed, run the epochs, then fit the temperature."""
        held = self._held_out(source, y)
        held_X = self._epochs(source, d, y, None if held is None else ~held, held, valid, log)
        if self.calibrate != "temperature":
            return
        if held is not None and held.sum() >= CALIBRATE_ROWS:
            self.calibration_ = calibrate(self._logits(held_X), y[held], self._sample_weight(y)[held],
                                          "held-out rows")
        else:
            self.calibration_ = self._out_of_fold(source, d, y)
        self.temperature_ = self.calibration_["temperature"]

    def _held_out(self, source: InMemory | Streamed, y: np.ndarray) -> np.ndarray | None:
        """(n,) bool: the rows held out by content hash, for early stopping or a temperature; None for none."""
        enough = len(y) * self.validation_fraction >= CALIBRATE_ROWS
        if self.patience is None and not (self.calibrate == "temperature" and enough):
            return None
        held = source.hashes(len(y)) < self.validation_fraction
        return held if 0 < held.sum() < len(y) else None

    def _epochs(self, source: InMemory | Streamed, d: int, y: np.ndarray, keep: np.ndarray | None,
                held: np.ndarray | None, valid: tuple | None, log: EpochLog) -> np.ndarray | None:
        """Run the epochs of Adam steps over the rows `keep` (all where None), each logged.

        With `patience`, the `held` rows' loss stops them and the best epoch's weights are kept. Returns the held
        rows' features (or None).
        """
        rng = np.random.default_rng(self.random_state)
        n = len(y) if keep is None else int(keep.sum())
        passes = passes_per_epoch(self.min_steps, self.epochs, n, self.batch_size)
        run = AdamTraining(self, d, y, self._sample_weight(y), self.epochs * passes, rng)
        self.layers_ = run.layers  # views, so that the log scores the current weights
        trained = slice(None) if keep is None else keep
        held_X = None if held is None else source.take(held)
        best, stop = None, False  # best: (held-out loss, epoch, layers)
        with threadpool_limits(1, user_api="blas"):
            for epoch in range(1, self.epochs + 1):
                ms = run.epoch(source.batches(rng, self.batch_size, keep, passes))
                extra = {"passes": passes} if passes > 1 else {}
                if held is not None:
                    loss, accuracy = loss_and_accuracy(y[held], softmax(self._logits(held_X)))
                    extra |= {"holdout_loss": loss, "holdout_accuracy": accuracy}
                    if best is None or loss < best[0]:
                        best = (loss, epoch, run.snapshot() if self.patience else None)
                    stop = self.patience is not None and epoch - best[1] >= self.patience
                    if self.patience and (stop or epoch == self.epochs):
                        extra |= {"best_epoch": best[1], "stopped_early": stop}
                # Running training loss and accuracy over the epoch, as Keras reports them.
                self._log(log, epoch, ms, loss_and_accuracy(y[trained], run.proba[trained]), valid, **extra)
                if stop:
                    break
        if self.patience and best is not None:
            self.layers_, self.best_epoch_, self.stopped_early_ = best[2], best[1], stop
        else:
            self.layers_ = run.snapshot()
        return held_X

    def _out_of_fold(self, source: InMemory | Streamed, d: int, y: np.ndarray) -> dict:
        """Fit the temperature on out-of-fold logits: 3 folds by content hash, the head retrained on the others."""
        fold = hash_folds(source, len(y), 3)
        z = np.zeros((len(y), len(self.classes_)), np.float32)
        for i in range(3):
            test = fold == i
            if not test.any() or test.all():
                continue
            part = clone(self).set_params(calibrate="none", patience=None)
            part.classes_, part.mean_, part.scale_, part.history_ = self.classes_, self.mean_, self.scale_, []
            part._epochs(source, d, y, ~test, None, None, lambda _: None)
            z[test] = part._logits(source.take(test))
        tested = np.isin(fold, [i for i in range(3) if 0 < (fold == i).sum() < len(y)])
        return calibrate(z[tested], y[tested], self._sample_weight(y)[tested], "out-of-fold (3 folds by content hash)")


class MLPHead(_AdamHead):
    """Hidden Dense+ReLU+dropout layers, then Dense(n_classes) with softmax, trained by minibatch Adam.

    Parameters
    ----------
    hidden : tuple of int
        The hidden layers' sizes.
    dropout : float
        The fraction of each hidden layer's outputs dropped while training, in [0, 1).
    epochs : int
        Epochs of training: each one pass over the training rows, or as many passes as it takes for all the
        epochs to make `min_steps` Adam steps.
    lr : float
        Adam's learning rate.
    batch_size : int
        Rows per Adam step (the command line's ``--minibatch``).
    l2 : float
        Penalty on the mean loss: `l2` times the sum of the weights' squares.
    min_steps : int
        The fewest Adam steps of a fit (see `epochs`): a few dozen steps from the start do not converge.
    patience : int or None
        Early stopping: stop once the held-out rows' loss has not fallen for this many epochs, and keep the
        best epoch's weights (recorded in the last `history_` record: best_epoch, stopped_early). None: off.
    validation_fraction : float
        The share of the training rows held out for `patience` (and for `calibrate` from 500 rows), chosen by
        each row's content hash, so the same rows whatever their order.
    standardize : bool
        Standardize each feature by the training rows' mean and standard deviation first (kept in the head).
    calibrate : {"none", "temperature"}
        "temperature": divide the logits by a temperature fitted on the held-out rows' logits (from 50 of them),
        else on out-of-fold logits (3 folds by content hash); kept in the head file and the bundled graph.
    class_weight : {None, "balanced"}
        "balanced" weighs each row inversely to its class's frequency.
    random_state : int or None
        Seed of the initial weights, the shuffling and dropout; None for a fresh one each fit.

    Attributes
    ----------
    classes_ : numpy.ndarray
        (k,) the class labels seen in ``fit``, the columns of ``predict_proba``.
    n_features_in_ : int
        The number of features ``fit`` saw.
    mean_, scale_ : numpy.ndarray
        (D,) float32, the standardization.
    layers_ : list of tuple
        The dense layers [(W (D_in, D_out), b (D_out,))], ReLU between them, softmax after the last.
    history_ : list of dict
        One record per epoch: train (and valid, held-out) loss and accuracy, milliseconds, passes.
    temperature_ : float
        Divides the logits (1.0 uncalibrated); `calibration_` says how it was fitted (method, rows).
    best_epoch_, stopped_early_ : int, bool
        With `patience`: the epoch whose weights were kept, and whether training stopped before `epochs`.
    meta_ : dict
        What `headstart.train_head` or `load_head` recorded: task, layer, the features' fingerprint, metrics.

    Examples
    --------
    >>> import numpy as np, headstart as hs
    >>> X, y = np.random.default_rng(0).normal(size=(40, 8)), np.repeat(["cat", "dog"], 20)
    >>> head = hs.MLPHead(hidden=(16,), epochs=5).fit(X, y)
    >>> head.predict_proba(X).shape
    (40, 2)
    """

    def __init__(self, hidden: tuple[int, ...] = (256,), dropout: float = 0.5, epochs: int = 20, lr: float = 1e-3,
                 batch_size: int = 64, l2: float = 1e-4, min_steps: int = 2000, patience: int | None = None,
                 validation_fraction: float = 0.1, standardize: bool = True, calibrate: str = "none",
                 class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.l2 = l2
        self.min_steps = min_steps
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.standardize = standardize
        self.calibrate = calibrate
        self.class_weight = class_weight
        self.random_state = random_state


class SoftmaxHead(_AdamHead):
    """Multinomial logistic regression by minibatch Adam: Keras' Dense(n_classes, softmax) on frozen features.

    Parameters
    ----------
    epochs : int
        Epochs of training: each one pass over the training rows, or as many passes as it takes for all the
        epochs to make `min_steps` Adam steps.
    lr : float
        Adam's learning rate.
    batch_size : int
        Rows per Adam step (the command line's ``--minibatch``).
    l2 : float
        Penalty on the mean loss: `l2` times the sum of the weights' squares.
    min_steps : int
        The fewest Adam steps of a fit (see `epochs`): a few dozen steps from the start do not converge.
    patience : int or None
        Early stopping: stop once the held-out rows' loss has not fallen for this many epochs, and keep the
        best epoch's weights (recorded in the last `history_` record: best_epoch, stopped_early). None: off.
    validation_fraction : float
        The share of the training rows held out for `patience` (and for `calibrate` from 500 rows), chosen by
        each row's content hash, so the same rows whatever their order.
    standardize : bool
        Standardize each feature by the training rows' mean and standard deviation first (kept in the head).
    calibrate : {"none", "temperature"}
        "temperature": divide the logits by a temperature fitted on the held-out rows' logits (from 50 of them),
        else on out-of-fold logits (3 folds by content hash); kept in the head file and the bundled graph.
    class_weight : {None, "balanced"}
        "balanced" weighs each row inversely to its class's frequency.
    random_state : int or None
        Seed of the initial weights, the shuffling and dropout; None for a fresh one each fit.

    Attributes
    ----------
    classes_ : numpy.ndarray
        (k,) the class labels seen in ``fit``, the columns of ``predict_proba``.
    n_features_in_ : int
        The number of features ``fit`` saw.
    mean_, scale_ : numpy.ndarray
        (D,) float32, the standardization.
    layers_ : list of tuple
        The dense layers [(W (D_in, D_out), b (D_out,))], ReLU between them, softmax after the last.
    history_ : list of dict
        One record per epoch: train (and valid, held-out) loss and accuracy, milliseconds, passes.
    temperature_ : float
        Divides the logits (1.0 uncalibrated); `calibration_` says how it was fitted (method, rows).
    best_epoch_, stopped_early_ : int, bool
        With `patience`: the epoch whose weights were kept, and whether training stopped before `epochs`.
    meta_ : dict
        What `headstart.train_head` or `load_head` recorded: task, layer, the features' fingerprint, metrics.

    Examples
    --------
    >>> import numpy as np, headstart as hs
    >>> X, y = np.random.default_rng(0).normal(size=(40, 8)), np.repeat(["cat", "dog"], 20)
    >>> head = hs.SoftmaxHead(epochs=5).fit(X, y)
    >>> head.predict(X[:2]).tolist() in (["cat", "cat"], ["cat", "dog"], ["dog", "cat"], ["dog", "dog"])
    True
    """

    def __init__(self, epochs: int = 20, lr: float = 1e-3, batch_size: int = 64, l2: float = 1e-4,
                 min_steps: int = 2000, patience: int | None = None, validation_fraction: float = 0.1,
                 standardize: bool = True, calibrate: str = "none", class_weight: str | None = None,
                 random_state: int | None = 0) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.l2 = l2
        self.min_steps = min_steps
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.standardize = standardize
        self.calibrate = calibrate
        self.class_weight = class_weight
        self.random_state = random_state


class LogisticHead(DenseHead):
    """Logistic regression: scikit-learn's objective, solved exactly by L-BFGS (heads.linear).

    Binary, or multinomial for more classes.

    Parameters
    ----------
    l2 : float
        Penalty on the mean loss, so C = 1 / (l2 * n_samples): comparable with the other heads' `l2`. Without
        standardization it applies as if the rows had the length of standardized ones (sqrt(D)), so the same
        penalty suits both.
    max_iter : int
        L-BFGS's iteration limit.
    standardize : bool
        Standardize each feature by the training rows' mean and standard deviation first (kept in the head).
    normalize : bool
        Scale each row to unit length first (then standardize, where `standardize`): the linear probe of CLIP and
        DINOv2; the head file and the bundle do the same.
    calibrate : {"none", "temperature"}
        "temperature": divide the logits by a temperature fitted on out-of-fold logits (5 folds, leave-one-out on
        few rows, a held-out tenth from 10,000; from 50 rows); kept in the head file and the bundled graph.
    class_weight : {None, "balanced"}
        "balanced" weighs each row inversely to its class's frequency.
    random_state : int or None
        Seed of the folds that `calibrate` draws.

    Attributes
    ----------
    classes_ : numpy.ndarray
        (k,) the class labels seen in ``fit``, the columns of ``predict_proba``.
    n_features_in_ : int
        The number of features ``fit`` saw.
    mean_, scale_ : numpy.ndarray
        (D,) float32, the standardization.
    layers_ : list of tuple
        The dense layers [(W (D_in, D_out), b (D_out,))], ReLU between them, softmax after the last.
    n_iter_ : int
        L-BFGS's iterations (not restored from a head file).
    history_ : list of dict
        One record: train (and valid) loss and accuracy, milliseconds, iterations.
    temperature_ : float
        Divides the logits (1.0 uncalibrated); `calibration_` says how it was fitted (method, rows).
    meta_ : dict
        What `headstart.train_head` or `load_head` recorded: task, layer, the features' fingerprint, metrics.

    Examples
    --------
    >>> import numpy as np, headstart as hs
    >>> X, y = np.random.default_rng(0).normal(size=(40, 8)), np.repeat(["cat", "dog"], 20)
    >>> X[y == "dog"] += 2
    >>> hs.LogisticHead().fit(X, y).score(X, y)
    1.0
    """

    def __init__(self, l2: float = 1e-2, max_iter: int = 2000, standardize: bool = True, normalize: bool = False,
                 calibrate: str = "none", class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.l2 = l2
        self.max_iter = max_iter
        self.standardize = standardize
        self.normalize = normalize
        self.calibrate = calibrate
        self.class_weight = class_weight
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        if self.l2 <= 0 or self.max_iter < 1:
            raise UsageError(f"LogisticHead: need l2 > 0 and max_iter >= 1; got l2={self.l2}, "
                             f"max_iter={self.max_iter}")

    def _fit(self, X, y, valid, log: EpochLog) -> None:
        from .linear import as_layer, fit_logistic, out_of_fold_logits

        t0 = time.perf_counter()
        Z = l2_normalize(X) if self.normalize else X.astype(np.float32)
        Z = (Z - self.mean_) / self.scale_
        # Unit rows are fitted at the length of a standardized row, sqrt(D): `l2` means the same for both, and
        # the solver's tolerance is met at the same precision. The factor goes into the weights.
        length = np.float32(np.sqrt(Z.shape[1])) if self.normalize and not self.standardize else np.float32(1)
        k = len(self.classes_)
        weight = self._sample_weight(y) if self.class_weight else None
        # AutoHead hands its refit the folds' mean solution as a start (`_init`); the optimum is the same.
        init = self.__dict__.pop("_init", None)
        theta, iterations = fit_logistic(Z * length, y, k, self.l2, weight, init=init, max_iter=self.max_iter,
                                         tol=1e-4)  # scikit-learn's default
        W, b = as_layer(theta, Z.shape[1], k)
        self.layers_ = [(W * length, b)]
        self.n_iter_ = iterations
        if self.calibrate == "temperature":  # each fold's fit starts from the whole fit's optimum
            folds, how = make_folds(y, 5, 10_000, self.random_state)
            z, tested = out_of_fold_logits(Z * length, y, k, self.l2, weight, theta, folds, self.max_iter)
            self.calibration_ = calibrate(z[tested], y[tested], self._sample_weight(y)[tested],
                                          f"out-of-fold ({how['method']})")
            self.temperature_ = self.calibration_["temperature"]
        ms = (time.perf_counter() - t0) * 1000
        self._log(log, 1, ms, loss_and_accuracy(y, softmax(self._logits(X))), valid, iterations=iterations)
