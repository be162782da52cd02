"""Compiled loops for the two places where numpy's one-operation-per-pass costs most: Adam's update over a pool5
MLP's 6.4M weights, and a softmax head's step over float16 pool5 rows. Each runs in one thread without the GIL;
the callers share the work out among threads. Compiled by numba on first use, and cached beside this file.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_JIT = {"nogil": True, "cache": True}
# 2**112: multiplies float16 bits shifted into float32's place into their value, exactly, subnormals included.
_HALF_SCALE = np.float32(2.0**112)


@numba.njit(**_JIT)
def adam(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, b1: float, b2: float, lr: float, eps: float,
         decay: float) -> None:
    """One pass of Adam over flat float32 p, g, m, v (in place), with scaled moments (see models.Adam)."""
    b1, b2, lr, eps, decay = np.float32(b1), np.float32(b2), np.float32(lr), np.float32(eps), np.float32(decay)
    for i in range(p.shape[0]):
        gi = g[i] + decay * p[i]
        mi = b1 * m[i] + gi
        vi = b2 * v[i] + gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= lr * (mi / (math.sqrt(vi) + eps))


@numba.njit(**_JIT)
def _widen_half(src: np.ndarray, row: np.ndarray, bits: np.ndarray) -> None:
    for j in range(src.shape[0]):
        u = np.uint32(src[j])
        bits[j] = ((u & 0x7FFF) << 13) | ((u & 0x8000) << 16)
    for j in range(src.shape[0]):
        row[j] *= _HALF_SCALE


# The dot products are sums in any order (as BLAS takes them), which lets them run in vector registers.
@numba.njit(fastmath={"reassoc", "contract"}, **_JIT)
def _linear_rows(X: np.ndarray, half: bool, rows: np.ndarray, W: np.ndarray, b: np.ndarray, y: np.ndarray,
                 scale: np.ndarray, flush: float, P: np.ndarray, G: np.ndarray, gs: np.ndarray) -> None:
    d, k = X.shape[1], W.shape[0]
    G[:] = 0
    gs[:] = 0
    row = np.empty(d, np.float32)
    bits = row.view(np.uint32)
    z = np.empty(k, np.float32)
    for r in range(rows.shape[0]):
        if half:  # X holds float16 bits
            _widen_half(X[rows[r]], row, bits)
        else:
            row[:] = X[rows[r]]
        top = -np.inf
        for c in range(k):
            w = W[c]
            acc = np.float32(0.0)
            for j in range(d):
                acc += row[j] * w[j]
            z[c] = acc + b[c]
            top = max(top, z[c])
        total = np.float32(0.0)
        for c in range(k):
            z[c] = np.float32(0.0) if z[c] - top < flush else np.float32(math.exp(z[c] - top))
            total += z[c]
        for c in range(k):
            P[r, c] = z[c] / total
            gc = (P[r, c] - (np.float32(1.0) if y[r] == c else np.float32(0.0))) * scale[r]
            gs[c] += gc
            out = G[c]
            for j in range(d):
                out[j] += gc * row[j]


def linear_rows(X: np.ndarray, rows: np.ndarray, W: np.ndarray, b: np.ndarray, y: np.ndarray, scale: np.ndarray,
                flush: float, P: np.ndarray, G: np.ndarray, gs: np.ndarray) -> None:
    """A linear softmax head's forward and backward pass over `rows` of X (n, d), float16 or float32, each row
    widened once and used from the core's cache: logits x @ W.T + b (W (k, d)), probabilities into P (len(rows),
    k) (those below exp(flush) of the row's largest taken as 0), and the gradient of sum(scale * cross-entropy)
    into G (k, d) and gs (k,). y: the rows' class indices."""
    half = X.dtype == np.float16
    _linear_rows(X.view(np.uint16) if half else X, half, rows, W, b, y, scale, np.float32(flush), P, G, gs)
