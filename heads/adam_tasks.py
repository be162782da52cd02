"""Adam heads for tasks beyond one label an image: numbers (`MLPRegressorHead`) and tags (`SigmoidHead`).

Both train by `training.AdamTraining`, the classifier heads' loop, under another loss (`SquaredError`,
`SigmoidBCE`), and end in the plain form the bundle exports: standardize by `mean_`, `scale_`, then the dense
`layers_` with ReLU between them (`base.dense_outputs`, `tuned.dense_nodes`). The regressor's last layer gives
the values themselves (the targets' standardization folded into it); the tag head's gives one logit per tag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from headstart.export.errors import DataError, UsageError

from .base import FLOATS, EpochLog, checked, dense_outputs, standardization
from .compute import mean_std
from .regression import regression_metrics
from .tags import best_thresholds, tag_matrix, tag_names
from .training import AdamTraining, InMemory, SigmoidBCE, SquaredError, hash_folds, passes_per_epoch

if TYPE_CHECKING:
    from sklearn.utils import Tags

Layers = list[tuple[np.ndarray, np.ndarray]]


class _AdamTaskHead(BaseEstimator):
    """What both heads share: the parameters' check, the standardization, the epochs of Adam, the dense outputs."""

    def _check_params(self) -> None:
        if not (all(int(h) >= 1 for h in self.hidden) and 0 <= self.dropout < 1 and self.epochs >= 1
                and self.lr > 0 and self.batch_size >= 1 and self.l2 >= 0 and self.min_steps >= 0):
            raise UsageError(f"{type(self).__name__}: need hidden sizes >= 1, 0 <= dropout < 1, epochs >= 1, "
                             f"lr > 0, batch_size >= 1, l2 >= 0, min_steps >= 0; got {self.get_params()}")

    def _features(self, X: np.ndarray) -> np.ndarray:
        """The training features checked, and `mean_`, `scale_` from them (finiteness checked there, in one pass)."""
        X = checked(validate_data, self, X, dtype=FLOATS, ensure_all_finite=False)
        self._check_params()
        self.mean_, self.scale_ = standardization(*mean_std([X], X.shape[1]))
        return X

    def _train(self, X: np.ndarray, targets: np.ndarray, loss: SigmoidBCE | SquaredError,
               keep: np.ndarray | None = None, on_epoch: Callable | None = None) -> Layers:
        """The layers after `epochs` epochs of at least `min_steps` Adam steps in all over the rows `keep` (all
        where None); `on_epoch(epoch, ms, passes, run)` after each."""
        rng = np.random.default_rng(self.random_state)
        n = len(targets) if keep is None else int(keep.sum())
        passes = passes_per_epoch(self.min_steps, self.epochs, n, self.batch_size)
        run = AdamTraining(self, X.shape[1], targets, np.ones(len(targets), np.float32), self.epochs * passes, rng,
                           loss)
        source = InMemory(X)
        with threadpool_limits(1, user_api="blas"):  # small products: BLAS's threads cost more than they save
            for epoch in range(1, self.epochs + 1):
                ms = run.epoch(source.batches(rng, self.batch_size, keep, passes))
                if on_epoch is not None:
                    on_epoch(epoch, ms, passes, run)
        return run.snapshot()

    def _outputs(self, X: np.ndarray) -> np.ndarray:
        """The last layer's outputs (n, D_out): what the bundled graph computes."""
        check_is_fitted(self)
        X = checked(validate_data, self, X, reset=False, dtype=FLOATS)
        return dense_outputs(X, self.mean_, self.scale_, self.layers_)

    def _record(self, log: EpochLog, rec: dict) -> None:
        self.history_.append(rec)
        log(rec)


class MLPRegressorHead(RegressorMixin, _AdamTaskHead):
    """Hidden Dense+ReLU+dropout layers, then Dense(n_targets), trained by minibatch Adam on the squared error.

    The features are standardized (`mean_`, `scale_`) and so are the targets while training (each by its mean
    and standard deviation, so several targets weigh alike); the targets' scale and mean are then folded into
    the last layer, so that its outputs are the predicted values themselves.

    Parameters
    ----------
    hidden : tuple of int
        The hidden layers' sizes; () for linear regression.
    dropout : float
        The fraction of each hidden layer's outputs dropped while training, in [0, 1). Less
        than MLPHead's 0.5: on generated curved targets 0.5 cost one of two targets much of its R2 (0.94 to
        0.58) where 0.1 cost neither.
    epochs : int
        Epochs of training: each one pass over the training rows, or as many passes as it takes for all the
        epochs to make `min_steps` Adam steps.
    lr : float
        Adam's learning rate.
    batch_size : int
        Rows per Adam step.
    l2 : float
        Penalty on the mean loss: `l2` times the sum of the weights' squares.
    min_steps : int
        The fewest Adam steps of a fit (see `epochs`).
    random_state : int or None
        Seed of the initial weights, the shuffling and dropout; None for a fresh one each fit.

    Attributes
    ----------
    n_features_in_ : int
        The number of features ``fit`` saw.
    n_outputs_ : int
        The number of targets; ``predict`` returns (n,) where it is 1.
    mean_, scale_ : numpy.ndarray
        (D,) float32, the features' standardization.
    target_mean_, target_scale_ : numpy.ndarray
        (n_outputs,) the targets' standardization while training (already folded into `layers_`).
    layers_ : list of tuple
        The dense layers [(W (D_in, D_out), b (D_out,))] float32, ReLU between them; the last one's outputs are
        the predictions.
    history_ : list of dict
        One record per epoch: milliseconds, passes, the running train RMSE (and the validation rows' RMSE and R2).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(200, 3))
    >>> y = np.sin(X[:, 0]) + X[:, 1] ** 2
    >>> head = MLPRegressorHead(hidden=(32,), epochs=5, min_steps=500).fit(X, y)
    >>> head.predict(X[:4]).shape
    (4,)
    """

    def __init__(self, hidden: tuple[int, ...] = (256,), dropout: float = 0.1, epochs: int = 20, lr: float = 1e-3,
                 batch_size: int = 64, l2: float = 1e-4, min_steps: int = 2000, random_state: int | None = 0
                 ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.l2 = l2
        self.min_steps = min_steps
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, *, X_valid: np.ndarray | None = None,
            y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> MLPRegressorHead:
        """Fit on X (n, D) float and y (n,) or (n, n_targets) numbers; X_valid/y_valid are only scored, for the log.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,) or (n_samples, n_targets)
        X_valid, y_valid : ndarray, optional
            Rows scored after each epoch for `history_` and `log`; never trained on.
        log : callable, optional
            Called with each epoch's record.
        """
        X = self._features(X)
        Y = _targets(y, len(X))
        valid = None
        if X_valid is not None and len(X_valid):
            valid = (checked(validate_data, self, X_valid, reset=False, dtype=FLOATS), _targets(y_valid, len(X_valid)))
            if valid[1].shape[1] != Y.shape[1]:
                raise UsageError(f"y_valid has {valid[1].shape[1]} targets, y has {Y.shape[1]}")
        self.n_outputs_ = Y.shape[1]
        mean, std = Y.mean(0), Y.std(0)
        self.target_mean_, self.target_scale_ = mean, np.where(std > 1e-12, std, 1.0)
        Z = ((Y - mean) / self.target_scale_).astype(np.float32)  # unit targets: lr and l2 mean the same for any
        self.history_ = []
        log = log or (lambda _: None)

        def on_epoch(epoch: int, ms: float, passes: int, run: AdamTraining) -> None:
            # running squared error of each row when its batch was trained on, in the targets' units
            mse = (((run.proba - Z) * self.target_scale_.astype(np.float32)) ** 2).mean()
            rec = {"epoch": epoch, "ms": round(ms, 2), "train_rmse": float(np.sqrt(mse))}
            if passes > 1:
                rec["passes"] = passes
            if valid is not None:
                z = dense_outputs(valid[0], self.mean_, self.scale_, run.layers)
                scores = regression_metrics(valid[1], z * self.target_scale_ + self.target_mean_)
                rec |= {"valid_rmse": scores["rmse"], "valid_r2": scores["r2"]}
            self._record(log, rec)

        W, b = (layers := self._train(X, Z, SquaredError(Z.shape[1]), on_epoch=on_epoch))[-1]
        # y = z * scale + mean folded into the last layer: prediction (and the bundle) is plain dense layers
        layers[-1] = ((W * self.target_scale_).astype(np.float32),
                      (b * self.target_scale_ + self.target_mean_).astype(np.float32))
        self.layers_ = layers
        return self

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True  # y (n, t): one output each
        return tags

    def predict(self, X: np.ndarray) -> np.ndarray:
        """The predicted values, (n,) for one target or (n, n_targets)."""
        out = self._outputs(X).astype(np.float64)  # float64 as scikit-learn's regressors (the graph's are float32)
        return out[:, 0] if self.n_outputs_ == 1 else out


class SigmoidHead(_AdamTaskHead):
    """A multi-label head by minibatch Adam: one sigmoid per tag, binary cross-entropy, dense layers before it.

    Each tag's decision threshold maximizes its F1 on out-of-fold probabilities of the training rows: `folds`
    folds by each row's content hash (equal rows share a fold), the head retrained on the others; then the head
    is fitted on all rows. A fit thus costs ``folds + 1`` trainings. Validation rows are never read for it.

    Parameters
    ----------
    hidden : tuple of int
        The hidden layers' sizes; () (the default) for one linear layer, the logistic probe.
    dropout : float
        The fraction of each hidden layer's outputs dropped while training, in [0, 1).
    epochs : int
        Epochs of training: each one pass over the training rows, or as many passes as it takes for all the
        epochs to make `min_steps` Adam steps.
    lr : float
        Adam's learning rate.
    batch_size : int
        Rows per Adam step.
    l2 : float
        Penalty on the mean loss: `l2` times the sum of the weights' squares.
    min_steps : int
        The fewest Adam steps of a fit (see `epochs`).
    folds : int
        Folds of the training rows for the thresholds, at least 2.
    random_state : int or None
        Seed of the initial weights, the shuffling and dropout; None for a fresh one each fit.

    Attributes
    ----------
    tags_ : numpy.ndarray
        (n_tags,) str, the tags in the order of the columns of `Y`.
    thresholds_ : numpy.ndarray
        (n_tags,) each tag's decision threshold on its probability (0.5 for a tag no held-out row decides).
    n_features_in_ : int
        The number of features ``fit`` saw.
    mean_, scale_ : numpy.ndarray
        (D,) float32, the standardization.
    layers_ : list of tuple
        The dense layers [(W (D_in, D_out), b (D_out,))] float32, ReLU between them; the last one's outputs are
        the tags' logits.
    history_ : list of dict
        One record per epoch of the final fit: milliseconds, passes, the running train loss (mean binary
        cross-entropy per row and tag; and the validation rows').

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> Y = np.stack([X[:, 0] > 0, X[:, 1] > 0.5], axis=1)
    >>> head = SigmoidHead(epochs=5, min_steps=300).fit(X, Y, tags=["a", "b"])
    >>> head.predict(X[:3]).shape, head.thresholds_.shape
    ((3, 2), (2,))
    """

    def __init__(self, hidden: tuple[int, ...] = (), dropout: float = 0.0, epochs: int = 20, lr: float = 1e-3,
                 batch_size: int = 64, l2: float = 1e-4, min_steps: int = 2000, folds: int = 3,
                 random_state: int | None = 0) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.l2 = l2
        self.min_steps = min_steps
        self.folds = folds
        self.random_state = random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, tags: list[str] | None = None, *, X_valid: np.ndarray | None = None,
            Y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> SigmoidHead:
        """Choose each tag's threshold on folds of these rows, then fit on all of them.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
        Y : ndarray of shape (n_samples, n_tags)
            1 (or True) where a row has the tag.
        tags : list of str, optional
            The tags' names (default "0", "1", ...).
        X_valid, Y_valid : ndarray, optional
            Rows scored after each epoch of the final fit, for `history_` and `log`; never trained on, nor read
            for the thresholds.
        log : callable, optional
            Called with each epoch's record.
        """
        X = self._features(X)
        Y = tag_matrix(Y, len(X), "Y")
        if self.folds < 2:
            raise UsageError(f"folds must be at least 2, got {self.folds!r}")
        self.tags_ = tag_names(tags, Y.shape[1])
        valid = None
        if X_valid is not None and len(X_valid):
            valid = (checked(validate_data, self, X_valid, reset=False, dtype=FLOATS),
                     tag_matrix(Y_valid, len(X_valid), "Y_valid"))
            if valid[1].shape[1] != Y.shape[1]:
                raise UsageError(f"Y_valid has {valid[1].shape[1]} tags, Y has {Y.shape[1]}")
        loss = SigmoidBCE(Y.shape[1])
        # out-of-fold probabilities by content hash, as _AdamHead's temperature: the same folds in any row order
        fold = hash_folds(InMemory(X), len(X), self.folds)
        proba, tested = np.zeros(Y.shape, np.float32), np.zeros(len(X), bool)
        for i in range(self.folds):
            test = fold == i
            if test.any() and not test.all():
                proba[test] = expit(dense_outputs(X[test], self.mean_, self.scale_, self._train(X, Y, loss, ~test)))
                tested |= test
        self.thresholds_ = (best_thresholds(Y[tested], proba[tested]) if tested.any()
                            else np.full(Y.shape[1], 0.5))
        self.history_ = []
        log = log or (lambda _: None)

        def on_epoch(epoch: int, ms: float, passes: int, run: AdamTraining) -> None:
            rec = {"epoch": epoch, "ms": round(ms, 2), "train_loss": _bce_from_proba(Y, run.proba)}
            if passes > 1:
                rec["passes"] = passes
            if valid is not None:
                rec["valid_loss"] = _bce(valid[1], dense_outputs(valid[0], self.mean_, self.scale_, run.layers))
            self._record(log, rec)

        self.layers_ = self._train(X, Y, loss, on_epoch=on_epoch)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(n, n_tags) logits: the last layer's outputs."""
        return self._outputs(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, n_tags) probability of each tag, independently."""
        return expit(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, n_tags) booleans: each tag's probability at or above its threshold."""
        return self.predict_proba(X) >= self.thresholds_


def _targets(y: np.ndarray | None, n: int) -> np.ndarray:
    """Regression targets as float64 (n, n_targets); none, a wrong shape or non-numbers are a UsageError."""
    if y is None:  # scikit-learn's wording, which its checks look for
        raise UsageError("MLPRegressorHead requires y to be passed, but the target y is None")
    y = np.asarray(y)
    try:  # numbers held as objects are numbers
        Y = y.astype(np.float64) if y.dtype.kind in "biufO" else None
    except (TypeError, ValueError):
        Y = None
    if Y is None or y.ndim not in (1, 2) or len(y) != n or y.size == 0:
        raise UsageError(f"targets must be an (n_samples,) or (n_samples, n_targets) array of numbers for {n} "
                         f"rows, got shape {y.shape} of {y.dtype}")
    Y = Y.reshape(n, -1)
    if not np.isfinite(Y).all():
        raise DataError(f"the targets hold NaN or infinite values in {int((~np.isfinite(Y)).any(1).sum())} rows")
    return Y


def _bce(Y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy per row and tag, from logits."""
    return float((np.logaddexp(0, z) - Y * z).mean(dtype=np.float64))


def _bce_from_proba(Y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy per row and tag, from probabilities (kept off 0 and 1)."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(Y * np.log(p) + (1 - Y) * np.log1p(-p)).mean(dtype=np.float64))
