"""Replacement heads for a frozen body, as scikit-learn estimators: `fit(X, y)`, `predict_proba(X)`, `score`.

Every fitted head ends as the same plain form, which is what gets saved and bundled into ONNX: standardize
(`mean_`, `scale_`), then dense layers `layers_` [(W (D_in, D_out), b)] with ReLU between them, then softmax
over `classes_`. They know nothing of where features come from: X is any (n_samples, n_features) float array.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from .metrics import loss_and_accuracy

EpochLog = Callable[[dict], None]
# float16 features stay float16 (pool5 at 224 px is 1.25 GB per 25,000 images); blocks are widened as used.
FLOATS = [np.float32, np.float64, np.float16]
# Probabilities below exp(-40) of a row's largest count as 0: Intel CPUs compute the subnormals they lead to in
# microcode, and a gradient that small is far below Adam's epsilon (1e-7). Figures: docs/benchmarks.md.
FLUSH = -40.0
# Bytes of a float32 batch from which the first layer's products go to onnxruntime (see _train).
LARGE = 2**20
# Feature values a softmax head's training reads (rows x epochs x features) from which its steps run compiled
# (see _train): the point where the compiled step saves more than loading numba costs (docs/benchmarks.md).
COMPILE_WORK = 6 * 10**8
# The smallest row length l2_normalize divides by (the bundle's graph divides by the same).
NORM_EPS = 1e-12


def _rows_per_block(d: int, itemsize: int, budget: int = 64 * 2**20) -> int:
    """Rows of a temporary (rows, d) block within `budget` bytes: 4,096 gap rows, 334 float64 pool5 rows."""
    return max(1, min(4096, budget // (d * itemsize)))


@np.errstate(invalid="ignore", over="ignore")  # NaN and infinity are reported from the result (_set_stats)
def _mean_std(blocks: Iterable[np.ndarray], d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (float64, (d,)) of row blocks, in one pass.

    Sub-blocks of at most 64 MB are widened to float32 (float16 sums overflow), centred on their own mean before
    squaring and merged in float64 (Chan et al.), so a spread small beside the mean is not lost to cancellation.
    """
    n, mean, m2 = 0, np.zeros(d), np.zeros(d)
    rows, widen = _rows_per_block(d, 4), Widen(d)
    buf = np.empty((rows, d), np.float32)
    for block in blocks:
        for i in range(0, len(block), rows):
            k = min(rows, len(block) - i)
            b = widen(block, np.arange(i, i + k), buf[:k])
            block_mean = b.mean(0, dtype=np.float64)
            b -= block_mean.astype(np.float32)
            delta, n = block_mean - mean, n + k
            mean += delta * (k / n)
            m2 += np.einsum("ij,ij->j", b, b) + delta**2 * (k * (n - k) / n)
    return mean, np.sqrt(m2 / n)


def l2_normalize(X: np.ndarray) -> np.ndarray:
    """Rows (n, D) scaled to unit length, as float32; an all-zero row stays zero."""
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), NORM_EPS)


def softmax(z: np.ndarray, flush: float | None = None) -> np.ndarray:
    """Row-wise softmax of (n, k) logits; `flush`: probabilities below exp(flush) times the largest become 0."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    if flush is not None:
        e[z < flush] = 0
    return e / e.sum(axis=1, keepdims=True)


class DenseHead(ClassifierMixin, BaseEstimator):
    """What every head shares once fitted: inference, bookkeeping and the epoch log. Subclasses implement `_fit`.

    Fitted attributes: `classes_` (k,), `n_features_in_`, `mean_`/`scale_` (D,), `layers_`, `history_`
    (one dict per epoch: train and valid loss and accuracy, milliseconds).
    """

    def fit(self, X: np.ndarray, y: np.ndarray, *, X_valid: np.ndarray | None = None,
            y_valid: np.ndarray | None = None, log: EpochLog | None = None) -> DenseHead:
        """Fit on X (n, D) float and y (n,) labels of any kind; X_valid/y_valid are only scored, for the log."""
        # Finiteness comes free with the standardization statistics (see _set_stats), sparing sklearn's own pass.
        X, y = validate_data(self, X, y, dtype=FLOATS, ensure_all_finite=not self.standardize)
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
        if self.standardize and getattr(self, "normalize", False):
            self._set_stats(*_mean_std([l2_normalize(X)], d))
        elif self.standardize:
            self._set_stats(*_mean_std([X], d))
        else:
            self._set_stats(np.zeros(d), np.ones(d))

    def _set_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(std)))
        if len(bad):
            raise ValueError(f"the training features hold NaN or infinite values (or values beyond float32's range) "
                             f"in {len(bad)} of {len(mean)} columns (first: {bad[:5].tolist()}); remove or repair "
                             "the rows that hold them")
        if not self.standardize:
            mean, std = np.zeros_like(mean), np.ones_like(std)
        self.mean_, self.scale_ = mean.astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)

    def _sample_weight(self, y_index: np.ndarray) -> np.ndarray:
        return compute_sample_weight(self.class_weight, y_index).astype(np.float32)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((len(X), len(self.classes_)), np.float32)
        batch = _rows_per_block(X.shape[1], 4)
        for i in range(0, len(X), batch):
            h = X[i:i + batch].astype(np.float32)
            if getattr(self, "normalize", False):
                h = l2_normalize(h)
            h = (h - self.mean_) / self.scale_
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
        self._set_stats(*_mean_std((block for _, block in blocks(None)), n_features))
        self.history_ = []

        def batches(rng: np.random.Generator):
            for rows, block in blocks(rng):
                order = rng.permutation(len(rows))
                for i in range(0, len(rows), self.batch_size):
                    pick = np.sort(order[i:i + self.batch_size])
                    yield rows[pick], block, pick

        self._train(batches, n_features, y_index, valid, log or (lambda _: None))
        return self

    def _train(self, batches: Callable, d: int, y: np.ndarray, valid, log: EpochLog) -> None:
        """Epochs of Adam steps over `batches(rng)`: (rows into y, raw features, the rows of those) per minibatch."""
        rng = np.random.default_rng(self.random_state)
        k = len(self.classes_)
        sizes = [d, *(int(h) for h in self.hidden), k]
        # A linear softmax layer starts at zero, as scikit-learn's solvers do: the problem is convex, and a random
        # start is noise that a small dataset's few dozen steps cannot undo. Hidden layers need a random start.
        init = [((rng.standard_normal((a, b)) * np.sqrt((2.0 if i < len(sizes) - 2 else 1.0) / a)
                  * (len(sizes) > 2)).astype(np.float32), np.zeros(b, np.float32))
                for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
        # Standardizing a batch costs 2 passes over it; folding the standardization into the first layer
        # instead costs 2 passes over that layer's weights: fold when they are the smaller (softmax on pool5).
        fold = sizes[1] < self.batch_size
        if fold:  # trained as (out, d), so that its products, scaling and update all run along rows
            init[0] = (np.ascontiguousarray(init[0][0].T), init[0][1])
        sw = self._sample_weight(y)
        onehot = np.eye(k, dtype=np.float32)
        proba = np.empty((len(y), k), np.float32)  # each row's probabilities when its batch was trained on
        inv, mean = 1.0 / self.scale_, self.mean_
        shift = mean * inv
        w_eff = np.empty((sizes[1], d), np.float32) if fold else None
        widen = Widen(d)
        batch = np.empty((self.batch_size, d), np.float32)  # reused: allocating a pool5 batch costs more than using it
        # The first layer's products with a large batch (pool5) run in onnxruntime on every core; all else is
        # small and runs on one BLAS thread. OpenBLAS's threads spin for a while after each call and keep the
        # cores from the other threads (widening, Adam); onnxruntime's sleep.
        large = self.batch_size * d * 4 >= LARGE
        product = Product(large)
        # A softmax head on a large batch (pool5) takes its rows through a compiled loop instead, shared among the
        # cores: each row's float16 values are widened in the vector registers and used from the core's cache by
        # the forward and the backward pass, where numpy's products read the widened batch back from memory twice.
        # With numba loaded for it, Adam's update is compiled too.
        compiled = fold and len(sizes) == 2 and large and len(y) * self.epochs * d >= COMPILE_WORK
        adam = Adam([p for layer in init for p in layer], decay=[self.l2, 0.0] * len(init),  # weights, not biases
                    compiled=compiled)
        params, grads = adam.params, adam.grads  # views of Adam's own vectors, updated and written in place
        self.layers_ = [(params[2 * i].T if i == 0 and fold else params[2 * i], params[2 * i + 1])
                        for i in range(len(init))]
        parts = [(np.empty((k, d), np.float32), np.empty(k, np.float32)) for _ in range(_cores())] if compiled else []
        P = np.empty((self.batch_size, k), np.float32) if compiled else None  # the compiled step's probabilities

        def compiled_step(idx: np.ndarray, source: np.ndarray, rows: np.ndarray, w: np.ndarray, c: np.ndarray,
                          scale: np.ndarray) -> None:
            """grads[0] = g.T @ x and grads[1] = g summed over the batch, and its rows' probabilities."""
            from .kernels import linear_rows

            n = len(idx)
            cut = [n * i // len(parts) for i in range(len(parts) + 1)]
            _share([lambda a=a, b=b, G=G, gs=gs: linear_rows(source, rows[a:b], w, c, y[idx[a:b]], scale[a:b], FLUSH,
                                                             P[a:b], G, gs)
                    for a, b, (G, gs) in zip(cut[:-1], cut[1:], parts, strict=True)])
            grads[0][:], grads[1][:] = parts[0]
            for G, gs in parts[1:]:
                grads[0] += G
                grads[1] += gs
            proba[idx] = P[:n]

        with threadpool_limits(1, user_api="blas"):
            for epoch in range(1, self.epochs + 1):
                t0 = time.perf_counter()
                for idx, source, rows in batches(rng):
                    W0, b0 = params[0], params[1]
                    scale = sw[idx] / sw[idx].sum()  # each row's weight in the batch's mean loss
                    if fold:  # ((h - mean) * inv) @ W0.T + b0 == h @ w_eff.T + b_eff: h stays as it is
                        np.multiply(W0, inv, out=w_eff)
                        b_eff = b0 - W0 @ shift
                    if compiled and source.dtype in (np.float16, np.float32) and source.flags.c_contiguous:
                        compiled_step(idx, source, rows, w_eff, b_eff, scale)
                    else:
                        h = widen(source, rows, batch[:len(idx)])
                        if fold:
                            z = product(h, w_eff, trans_b=True) + b_eff
                        else:
                            h -= mean
                            h *= inv
                            z = product(h, W0) + b0
                        acts, masks = [h], []
                        for W, b in self.layers_[1:]:
                            h = np.maximum(z, 0)
                            if self.dropout:
                                keep = np.float32(1 - self.dropout)
                                mask = (rng.random(h.shape, dtype=np.float32) >= self.dropout) / keep
                                h *= mask
                                masks.append(mask)
                            acts.append(h)
                            z = h @ W + b
                        p = softmax(z, flush=FLUSH)
                        proba[idx] = p
                        g = p - onehot[y[idx]]  # d(weighted mean CE)/d(logits)
                        g *= scale[:, None]
                        for j in range(len(self.layers_) - 1, -1, -1):
                            grads[2 * j + 1][:] = g.sum(0)
                            if j == 0 and fold:  # from the raw features, unfolded below
                                product(g, acts[0], trans_a=True, out=grads[0])
                                break
                            if j == 0:
                                product(acts[0], g, trans_a=True, out=grads[0])
                            else:
                                np.matmul(acts[j].T, g, out=grads[2 * j])
                                g = (g @ self.layers_[j][0].T) * (acts[j] > 0)
                                if self.dropout:
                                    g *= masks[j - 1]
                    if fold:  # the folded layer's gradient: inv * (g.T @ h) - (g summed) * mean * inv
                        grads[0] *= inv
                        grads[0] -= grads[1][:, None] * shift
                    adam.step(self.lr)
                ms = (time.perf_counter() - t0) * 1000
                # Running training loss and accuracy over the epoch, as Keras reports them.
                self._log(log, epoch, ms, loss_and_accuracy(y, proba), valid)
        self.layers_ = [(np.ascontiguousarray(W), b.copy()) for W, b in self.layers_]  # out of Adam's vectors


class Adam:
    """Adam's update over parameters it keeps in one flat vector.

    `params[i]` and `grads[i]` are views of it shaped like the arrays given. Write a step's gradients into
    `grads`, then call `step` (which then leaves them changed).

    From PARALLEL parameters on (a pool5 MLP's first layer has 6.4M weights, updated every step), the update is
    one compiled pass over the weights, their gradient and moments, where numpy takes ten, shared out among the
    cores; below that, loading numba would cost more than it saves, unless the caller loads it anyway
    (`compiled`). The moments are kept scaled, as m / (1 - b1) and v / (1 - b2), which saves a pass over each.
    """

    PARALLEL = 1 << 20

    def __init__(self, params: list[np.ndarray], b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7,
                 decay: list[float] | None = None, compiled: bool = False) -> None:
        """Keep `params` in one vector; `decay[i]`: added to params[i]'s gradient times params[i] (an l2 penalty).

        `compiled`: the compiled update at any size.
        """
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0
        decay = decay or [0.0] * len(params)
        n = sum(p.size for p in params)
        self.p, self.g, self.m, self.v = (np.zeros(n, np.float32) for _ in range(4))
        self.params, self.grads, runs, at = [None] * len(params), [None] * len(params), [], 0
        # Grouped by penalty, so that each run of the vector has one.
        for i in sorted(range(len(params)), key=lambda i: -decay[i]):
            size = params[i].size
            self.params[i] = self.p[at:at + size].reshape(params[i].shape)
            self.params[i][...] = params[i]
            self.grads[i] = self.g[at:at + size].reshape(params[i].shape)
            if runs and runs[-1][2] == decay[i]:
                runs[-1][1] = at + size
            else:
                runs.append([at, at + size, decay[i]])
            at += size
        self.compiled = compiled or n >= self.PARALLEL
        self.tmp = None if self.compiled else np.empty(n, np.float32)
        if not self.compiled and len(runs) > 1:  # numpy's calls cost more than its passes here: one run
            runs = [[0, n, np.concatenate([np.full(end - start, d, np.float32) for start, end, d in runs])]]
        # Each worker takes its part of every run.
        workers = _cores() if n >= self.PARALLEL else 1
        bounds = [n * w // workers for w in range(workers + 1)]
        self.shares = [[(max(start, lo), min(end, hi), decay) for start, end, decay in runs
                        if max(start, lo) < min(end, hi)] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def step(self, lr: float) -> None:
        """One step, from the gradients written into `grads`."""
        self.t += 1
        # The bias corrections, and the moments' scales, go into the step size and epsilon.
        lr = lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t) * (1 - self.b1) / math.sqrt(1 - self.b2)
        eps = self.eps / math.sqrt(1 - self.b2)
        if not self.compiled:
            for a, b, decay in self.shares[0]:
                self._numpy(slice(a, b), lr, eps, decay)
            return
        from .kernels import adam

        _share([lambda share=share: [adam(self.p[a:b], self.g[a:b], self.m[a:b], self.v[a:b], self.b1, self.b2, lr,
                                          eps, decay) for a, b, decay in share] for share in self.shares])

    def _numpy(self, s: slice, lr: float, eps: float, decay: float | np.ndarray) -> None:
        p, g, m, v, t = self.p[s], self.g[s], self.m[s], self.v[s], self.tmp[s]
        if isinstance(decay, np.ndarray) or decay:  # one penalty, or each value's
            g += np.multiply(p, decay, out=t)
        m *= self.b1
        m += g
        v *= self.b2
        v += np.multiply(g, g, out=t)
        np.sqrt(v, out=t)
        t += eps
        np.divide(m, t, out=t)
        t *= lr
        p -= t


def _share(jobs: list[Callable[[], object]]) -> None:
    """Run the jobs at once, the first in this thread and the others in the pool's."""
    others = [_pool(os.getpid()).submit(job) for job in jobs[1:]]
    jobs[0]()
    for f in others:
        f.result()


def _cores() -> int:
    """Count the cores this process may run on, at most 8 (past that, memory, not cores, bounds the loops)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """Threads that share the compiled loops' work out among the cores (the loops let go of the GIL).

    One pool per process, since a forked child's copy of its parent's pool has no threads and would wait forever.
    """
    return ThreadPoolExecutor(max(1, _cores() - 1), thread_name_prefix="headstart-heads")


class Widen:
    """`source[rows]` as float32, into a buffer: a minibatch gathered and widened in one pass.

    float16 goes through onnxruntime's Gather and Cast on every core (numpy's take, then its float16 widening at
    about 0.6 billion values/s on this project's CPUs, take three times as long).
    """

    def __init__(self, d: int) -> None:
        self.d, self.session, self.bound = d, None, None

    def __call__(self, source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Gather `source[rows]` into `out` as float32; returns `out`."""
        if source.dtype == np.float32:  # "clip" since rows are valid: "raise" goes through a temporary copy
            return np.take(source, rows, axis=0, out=out, mode="clip")
        if source.dtype != np.float16 or not source.flags.c_contiguous:
            np.copyto(out, source[rows], casting="unsafe")
            return out
        if self.session is None:
            self.session = _gather_session(self.d)
        if self.bound is None or self.bound[0] is not source:
            io = self.session.io_binding()
            io.bind_cpu_input("x", source)  # the features' own memory, not a copy
            self.bound = (source, io)
        io = self.bound[1]
        io.bind_cpu_input("rows", np.ascontiguousarray(rows, np.int64))
        io.bind_output("y", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        self.session.run_with_iobinding(io)
        return out


def _gather_session(d: int):  # noqa: ANN202 - an onnxruntime InferenceSession
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Gather", ["x", "rows"], ["picked"], axis=0),
                               helper.make_node("Cast", ["picked"], ["y"], to=TensorProto.FLOAT)], "widen",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", d]),
                               helper.make_tensor_value_info("rows", TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", d])])
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _session(model):  # noqa: ANN001, ANN202 - an onnx ModelProto, an onnxruntime InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Its threads must not spin between calls: other threads (numpy's, Adam's) need the same cores right after.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class Product:
    """(a.T if trans_a else a) @ (b.T if trans_b else b), into `out` where given.

    By onnxruntime's Gemm for large operands, else numpy. Its threads sleep between calls, so the cores are free
    for the threads that run in between (Adam's, the widening's), where OpenBLAS's spin on for a while after each
    call.
    """

    def __init__(self, large: bool) -> None:
        self.sessions: dict[tuple[bool, bool], object] | None = {} if large else None

    def __call__(self, a: np.ndarray, b: np.ndarray, *, trans_a: bool = False, trans_b: bool = False,
                 out: np.ndarray | None = None) -> np.ndarray:
        """Multiply, into `out` where given; returns the product."""
        if out is None:
            out = np.empty((a.shape[1 if trans_a else 0], b.shape[0 if trans_b else 1]), np.float32)
        if self.sessions is None:
            return np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
        key = (trans_a, trans_b)
        if key not in self.sessions:
            self.sessions[key] = _gemm_session(*key)
        io = self.sessions[key].io_binding()
        io.bind_cpu_input("a", np.ascontiguousarray(a))
        io.bind_cpu_input("b", np.ascontiguousarray(b))
        io.bind_output("y", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        self.sessions[key].run_with_iobinding(io)
        return out


def _gemm_session(trans_a: bool, trans_b: bool):  # noqa: ANN202 - an onnxruntime InferenceSession
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Gemm", ["a", "b"], ["y"], transA=int(trans_a), transB=int(trans_b))],
                              "product", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"{n}0", f"{n}1"])
                                          for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", "n"])])
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _shuffled_batches(X: np.ndarray, batch_size: int, rng: np.random.Generator):
    """Minibatches of an in-memory X in a fresh random order: (rows, X, rows); Widen gathers them."""
    order = rng.permutation(len(X))
    for i in range(0, len(X), batch_size):
        idx = np.sort(order[i:i + batch_size])  # sorted rows gather faster from memory
        yield idx, X, idx


class MLPHead(_AdamHead):
    """Hidden Dense+ReLU+dropout layers, then Dense(n_classes) with softmax, trained by minibatch Adam.

    Parameters
    ----------
    hidden : tuple of int
        The hidden layers' sizes.
    dropout : float
        The fraction of each hidden layer's outputs dropped while training, in [0, 1).
    epochs : int
        Passes over the training rows.
    lr : float
        Adam's learning rate.
    batch_size : int
        Rows per Adam step (the command line's ``--minibatch``).
    l2 : float
        Penalty on the mean loss: `l2` times the sum of the weights' squares.
    standardize : bool
        Standardize each feature by the training rows' mean and standard deviation first (kept in the head).
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
        One record per epoch: train (and valid) loss and accuracy, milliseconds.
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
    """Multinomial logistic regression by minibatch Adam: Keras' Dense(n_classes, softmax) on frozen features.

    Parameters
    ----------
    epochs : int
        Passes over the training rows.
    lr : float
        Adam's learning rate.
    batch_size : int
        Rows per Adam step (the command line's ``--minibatch``).
    l2 : float
        Penalty on the mean loss: `l2` times the sum of the weights' squares.
    standardize : bool
        Standardize each feature by the training rows' mean and standard deviation first (kept in the head).
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
        One record per epoch: train (and valid) loss and accuracy, milliseconds.
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
                 standardize: bool = True, class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.l2 = l2
        self.standardize = standardize
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
        One record per epoch: train (and valid) loss and accuracy, milliseconds.
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
                 class_weight: str | None = None, random_state: int | None = 0) -> None:
        self.l2 = l2
        self.max_iter = max_iter
        self.standardize = standardize
        self.normalize = normalize
        self.class_weight = class_weight
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        if self.l2 <= 0 or self.max_iter < 1:
            raise ValueError(f"LogisticHead: need l2 > 0 and max_iter >= 1; got l2={self.l2}, "
                             f"max_iter={self.max_iter}")

    def _fit(self, X, y, valid, log: EpochLog) -> None:
        from .linear import as_layer, fit_logistic

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
        ms = (time.perf_counter() - t0) * 1000
        self._log(log, 1, ms, loss_and_accuracy(y, softmax(self._logits(X))), valid, iterations=iterations)
