"""The Adam heads' training loop, in named steps as scikit-learn's MLP has them (_init_coef, _forward_pass,
_backprop, _update): `AdamTraining` holds one fit's parameters and buffers; `epoch` runs one pass of `step`s.

Where its rows come from is a source: `InMemory` (an array) or `Streamed` (blocks read one at a time), both
giving minibatches as (rows into y, the array holding them, their rows in that array). What it minimizes is a
loss: `SoftmaxCE` (the classifier heads), `SigmoidBCE` (multi-label tags) or `SquaredError` (regression), each
turning a batch's outputs and targets into the outputs' gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
from scipy.special import expit

from .base import softmax
from .compute import Product, Widen, cores, row_hashes, rows_per_block, share
from .optimizers import Adam

# Probabilities below exp(-40) of a row's largest count as 0: Intel CPUs compute the subnormals they lead to in
# microcode, and a gradient that small is far below Adam's epsilon (1e-7).
FLUSH = -40.0
# Bytes of a float32 batch from which the first layer's products go to onnxruntime (see AdamTraining).
LARGE = 2**20
# Feature values a softmax head's training reads (rows x epochs x features) from which its steps run compiled:
# where the compiled step saves more than loading numba costs (docs/benchmarks.md, "Head training speed").
COMPILE_WORK = 6 * 10**8

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def passes_per_epoch(min_steps: int, epochs: int, n: int, batch_size: int) -> int:
    """Passes over `n` rows each epoch makes, so that `epochs` epochs take at least `min_steps` Adam steps: on
    small data an epoch is several passes, so that 8 rows and 80,000 rows both converge."""
    return max(1, math.ceil(min_steps / (epochs * math.ceil(max(n, 1) / batch_size))))


def hash_folds(source: InMemory | Streamed, n: int, k: int) -> np.ndarray:
    """(n,) each row's fold in 0..k-1, by its content hash: the same folds in any row order, equal rows together."""
    return np.minimum((source.hashes(n) * k).astype(int), k - 1)


class SoftmaxCE:
    """Softmax cross-entropy over `width` classes; targets are class indices (n,)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.onehot = np.eye(width, dtype=np.float32)

    def gradient(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the batch's probabilities, d(CE)/d(logits) per row) from logits z (b, k) and class indices y (b,)."""
        p = softmax(z, flush=FLUSH)
        return p, p - self.onehot[y]


class SigmoidBCE:
    """One sigmoid per output with binary cross-entropy, summed over outputs; targets are 0/1 (n, width)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def gradient(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the batch's probabilities, d(BCE)/d(logits) per row) from logits z (b, t) and targets y (b, t)."""
        p = expit(z)  # float32 in, float32 out, no overflow
        return p, p - y


class SquaredError:
    """Half the squared error, summed over outputs; targets are numbers (n, width)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def gradient(self, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the batch's predictions, d(loss)/d(outputs) per row) from outputs z (b, t) and targets y (b, t)."""
        return z, z - y


class InMemory:
    """Rows of an in-memory X (n, D): minibatches in a fresh random order each epoch."""

    def __init__(self, X: np.ndarray) -> None:
        self.X = X

    def stat_blocks(self) -> Iterator[np.ndarray]:
        yield self.X

    def batches(self, rng: np.random.Generator, batch_size: int, keep: np.ndarray | None = None, passes: int = 1
                ) -> Iterator[Batch]:
        """(rows, X, rows) per minibatch, over `passes` passes; `keep`: (n,) bool, the rows trained on (or all)."""
        for _ in range(passes):
            order = rng.permutation(len(self.X) if keep is None else np.flatnonzero(keep))
            for i in range(0, len(order), batch_size):
                idx = np.sort(order[i:i + batch_size])  # sorted rows gather faster from memory
                yield idx, self.X, idx

    def take(self, mask: np.ndarray) -> np.ndarray:
        """The rows where `mask`, in order, as stored."""
        return self.X[mask]

    def hashes(self, n: int) -> np.ndarray:
        """(n,) each row's content hash in [0, 1) (compute.row_hashes)."""
        step = rows_per_block(self.X.shape[1], 4)
        return np.concatenate([row_hashes(self.X[i:i + step]) for i in range(0, n, step)])


class Streamed:
    """Rows read block by block: `blocks(rng)` yields (rows into y, X_rows), every row once per call, in an
    order it shuffles with rng (as stored when rng is None); each block is shuffled again into minibatches."""

    def __init__(self, blocks: Callable, d: int) -> None:
        self.blocks, self.d = blocks, d

    def stat_blocks(self) -> Iterator[np.ndarray]:
        return (block for _, block in self.blocks(None))

    def batches(self, rng: np.random.Generator, batch_size: int, keep: np.ndarray | None = None, passes: int = 1
                ) -> Iterator[Batch]:
        """(rows into y, the block, the rows picked from it) per minibatch; `keep` as InMemory.batches. Each block
        read serves all `passes` passes over its rows, so that small data's extra passes read nothing again."""
        for rows, block in self.blocks(rng):
            for _ in range(passes):
                order = rng.permutation(len(rows))
                if keep is not None:
                    order = order[keep[rows[order]]]
                for i in range(0, len(order), batch_size):
                    pick = np.sort(order[i:i + batch_size])
                    yield rows[pick], block, pick

    def take(self, mask: np.ndarray) -> np.ndarray:
        """The rows where `mask` (by position into y), in y's order, gathered from the blocks."""
        where, parts = [], []
        for rows, block in self.blocks(None):
            hit = mask[rows]
            where.append(rows[hit])
            parts.append(np.asarray(block)[hit])
        if not parts:
            return np.zeros((0, self.d), np.float32)
        order = np.argsort(np.concatenate(where), kind="stable")
        return np.concatenate(parts)[order]

    def hashes(self, n: int) -> np.ndarray:
        """(n,) each row's content hash in [0, 1), by its position into y."""
        out = np.empty(n)
        for rows, block in self.blocks(None):
            out[rows] = row_hashes(block)
        return out


class AdamTraining:
    """One fit of dense layers by minibatch Adam on the weighted mean loss (softmax cross-entropy unless another
    is given) plus `l2` times the weights' squares: the parameters (in Adam's one vector), the buffers reused by
    every step, and the steps.

    Standardizing a batch costs 2 passes over it; folding the standardization into the first layer instead costs
    2 passes over that layer's weights: it is folded where the layer is narrower than the batch (a softmax head).
    The first layer's products with a large batch (pool5) run in onnxruntime on every core, all else on one BLAS
    thread: OpenBLAS's threads spin after each call and would keep the cores from the widening and Adam. A softmax
    head on a large batch takes its rows through a compiled loop instead (kernels.linear_rows), which widens each
    row's float16 values in the vector registers and uses them from the core's cache for both passes.
    """

    def __init__(self, head: object, d: int, y: np.ndarray, sample_weight: np.ndarray, epochs: int,
                 rng: np.random.Generator, loss: SoftmaxCE | SigmoidBCE | SquaredError | None = None) -> None:
        """`head`: the estimator (its hidden, dropout, batch_size, lr, l2, mean_, scale_, and classes_ where
        `loss` is None); y: the targets `loss` takes, (n,) class indices for the default SoftmaxCE over
        classes_; `epochs`: how many will run (it decides whether the compiled step pays)."""
        self.y, self.sw, self.rng = y, sample_weight, rng
        self.dropout, self.lr, self.batch_size = head.dropout, head.lr, head.batch_size
        self.loss = SoftmaxCE(len(head.classes_)) if loss is None else loss
        k = self.loss.width
        self.sizes = [d, *(int(h) for h in head.hidden), k]
        self.fold = self.sizes[1] < self.batch_size
        # Each row's outputs when its batch was trained on: probabilities (predictions for SquaredError).
        self.proba = np.empty((len(y), k), np.float32)
        self.inv, self.mean = 1.0 / head.scale_, head.mean_
        self.shift = self.mean * self.inv
        self.w_eff = np.empty((self.sizes[1], d), np.float32) if self.fold else None
        self.b_eff = None
        self.widen = Widen(d)
        self.batch = np.empty((self.batch_size, d), np.float32)  # reused: allocating a pool5 batch costs more
        large = self.batch_size * d * 4 >= LARGE
        self.product = Product(large)
        # The compiled loop computes softmax cross-entropy itself: only for that loss.
        self.compiled = (isinstance(self.loss, SoftmaxCE) and self.fold and len(self.sizes) == 2 and large
                         and len(y) * epochs * d >= COMPILE_WORK)
        init = self._init_params(rng)
        self.adam = Adam([p for layer in init for p in layer], decay=[head.l2, 0.0] * len(init),  # not biases
                         compiled=self.compiled)
        self.params, self.grads = self.adam.params, self.adam.grads  # views of Adam's vectors, updated in place
        self.parts = ([(np.empty((k, d), np.float32), np.empty(k, np.float32)) for _ in range(cores())]
                      if self.compiled else [])
        self.P = np.empty((self.batch_size, k), np.float32) if self.compiled else None

    def _init_params(self, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        """The starting layers: a linear layer (no hidden ones) at zero, hidden layers at He's random start.

        Zero as scikit-learn's solvers start: the problem is convex, and a random start is noise that a small
        dataset's few steps cannot undo. The draws are made either way, so the seed gives the same stream.
        """
        sizes = self.sizes
        init = [((rng.standard_normal((a, b)) * np.sqrt((2.0 if i < len(sizes) - 2 else 1.0) / a)
                  * (len(sizes) > 2)).astype(np.float32), np.zeros(b, np.float32))
                for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
        if self.fold:  # trained as (out, d), so that its products, scaling and update all run along rows
            init[0] = (np.ascontiguousarray(init[0][0].T), init[0][1])
        return init

    @property
    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The current layers [(W (D_in, D_out), b)], views of Adam's vector (the folded one transposed back)."""
        p = self.params
        return [(p[2 * i].T if i == 0 and self.fold else p[2 * i], p[2 * i + 1]) for i in range(len(p) // 2)]

    def snapshot(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """A copy of the current layers, out of Adam's vector."""
        return [(np.array(W, order="C"), b.copy()) for W, b in self.layers]

    def epoch(self, batches: Iterator[Batch]) -> float:
        """One pass of steps over `batches`; its milliseconds."""
        t0 = time.perf_counter()
        for idx, source, rows in batches:
            self.step(idx, source, rows)
        return (time.perf_counter() - t0) * 1000

    def step(self, idx: np.ndarray, source: np.ndarray, rows: np.ndarray) -> None:
        """One Adam step on the minibatch `source[rows]`, whose targets are y[idx]."""
        scale = self.sw[idx] / self.sw[idx].sum()  # each row's weight in the batch's mean loss
        if self.fold:  # ((h - mean) * inv) @ W0.T + b0 == h @ w_eff.T + b_eff: h stays as it is
            W0, b0 = self.params[0], self.params[1]
            np.multiply(W0, self.inv, out=self.w_eff)
            self.b_eff = b0 - W0 @ self.shift
        if self.compiled and source.dtype in (np.float16, np.float32) and source.flags.c_contiguous:
            self._compiled_step(idx, source, rows, scale)
        else:
            acts, masks, z = self._forward(self.widen(source, rows, self.batch[:len(idx)]))
            out, g = self.loss.gradient(z, self.y[idx])
            self.proba[idx] = out
            g *= scale[:, None]  # d(weighted mean loss)/d(outputs)
            self._backward(g, acts, masks)
        self._update()

    def _forward(self, h: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """The layers' inputs (after ReLU and dropout), the dropout masks and the outputs, from a raw batch h."""
        W0, b0 = self.params[0], self.params[1]
        if self.fold:
            z = self.product(h, self.w_eff, trans_b=True) + self.b_eff
        else:
            h -= self.mean
            h *= self.inv
            z = self.product(h, W0) + b0
        acts, masks = [h], []
        for W, b in self.layers[1:]:
            h = np.maximum(z, 0)
            if self.dropout:
                keep = np.float32(1 - self.dropout)
                mask = (self.rng.random(h.shape, dtype=np.float32) >= self.dropout) / keep
                h *= mask
                masks.append(mask)
            acts.append(h)
            z = h @ W + b
        return acts, masks, z

    def _backward(self, g: np.ndarray, acts: list[np.ndarray], masks: list[np.ndarray]) -> None:
        """The gradients into Adam's `grads`, from the outputs' gradient g; the folded layer's from the raw rows."""
        grads, layers = self.grads, self.layers
        for j in range(len(layers) - 1, -1, -1):
            grads[2 * j + 1][:] = g.sum(0)
            if j == 0 and self.fold:  # from the raw features, unfolded in _update
                self.product(g, acts[0], trans_a=True, out=grads[0])
                break
            if j == 0:
                self.product(acts[0], g, trans_a=True, out=grads[0])
            else:
                np.matmul(acts[j].T, g, out=grads[2 * j])
                g = (g @ layers[j][0].T) * (acts[j] > 0)
                if self.dropout:
                    g *= masks[j - 1]

    def _compiled_step(self, idx: np.ndarray, source: np.ndarray, rows: np.ndarray, scale: np.ndarray) -> None:
        """grads[0] = g.T @ x and grads[1] = g summed over the batch, and its rows' probabilities, by the compiled
        loop, the batch's rows shared among the cores."""
        from . import kernels

        n, parts, P = len(idx), self.parts, self.P
        cut = [n * i // len(parts) for i in range(len(parts) + 1)]
        share([lambda a=a, b=b, G=G, gs=gs: kernels.linear_rows(source, rows[a:b], self.w_eff, self.b_eff,
                                                                self.y[idx[a:b]], scale[a:b], FLUSH, P[a:b], G, gs)
               for a, b, (G, gs) in zip(cut[:-1], cut[1:], parts, strict=True)])
        self.grads[0][:], self.grads[1][:] = parts[0]
        for G, gs in parts[1:]:
            self.grads[0] += G
            self.grads[1] += gs
        self.proba[idx] = P[:n]

    def _update(self) -> None:
        """Unfold the folded layer's gradient, then one Adam step."""
        if self.fold:  # inv * (g.T @ h) - (g summed) * mean * inv
            self.grads[0] *= self.inv
            self.grads[0] -= self.grads[1][:, None] * self.shift
        self.adam.step(self.lr)
