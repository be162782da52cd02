"""The optimizer of the Adam heads, as scikit-learn keeps its own (neural_network/_stochastic_optimizers.py)
apart from its estimators: Adam over parameters it keeps in one flat vector."""

from __future__ import annotations

import math

import numpy as np

from .compute import cores, share


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
        workers = cores() if n >= self.PARALLEL else 1
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

        share([lambda part=part: [adam(self.p[a:b], self.g[a:b], self.m[a:b], self.v[a:b], self.b1, self.b2, lr,
                                       eps, decay) for a, b, decay in part] for part in self.shares])

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
