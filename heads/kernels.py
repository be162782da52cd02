"""Compiled loops for the two places where numpy's one-operation-per-pass costs most: Adam's update (over a pool5
MLP's 6.4M weights, or beside the softmax step) and a softmax head's step over float16 pool5 rows. Each runs in
one thread without the GIL; the callers share the work out among threads. Compiled by numba on first use, and
cached beside this file."""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# numpy's error model: Python's checks every division for zero, which keeps the loops out of the vector registers.
_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}
# The products' sums in any order (as BLAS takes them), which lets them run in vector registers.
_FAST = {"fastmath": {"reassoc", "contract"}, **_JIT}


@intrinsic
def _f32(typingctx, x):
    """A float32 from a float16's bits (the CPU's own conversion, exact for every half), or a float32 as it is."""
    if x == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen
    if x == types.float32:
        return types.float32(types.float32), lambda context, builder, signature, args: args[0]
    return None


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


# The softmax step takes the rows 4 at a time and the classes 2 at a time: each pass over the rows converts each
# float16 value once for 8 products, and each weight or gradient value read serves 4 rows. 4 x 2 sums fill half
# of the vector registers, with room for the loop's unrolling.
@numba.njit(**_FAST)
def _dot2(x0, x1, x2, x3, w0, w1):
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for j in range(x0.shape[0]):
        v0, v1, v2, v3, u, t = _f32(x0[j]), _f32(x1[j]), _f32(x2[j]), _f32(x3[j]), w0[j], w1[j]
        a0 += v0 * u
        a1 += v1 * u
        a2 += v2 * u
        a3 += v3 * u
        b0 += v0 * t
        b1 += v1 * t
        b2 += v2 * t
        b3 += v3 * t
    return a0, a1, a2, a3, b0, b1, b2, b3


@numba.njit(**_FAST)
def _dot1(x0, x1, x2, x3, w0):
    a0 = a1 = a2 = a3 = np.float32(0.0)
    for j in range(x0.shape[0]):
        u = w0[j]
        a0 += _f32(x0[j]) * u
        a1 += _f32(x1[j]) * u
        a2 += _f32(x2[j]) * u
        a3 += _f32(x3[j]) * u
    return a0, a1, a2, a3


@numba.njit(**_FAST)
def _add2(x0, x1, x2, x3, o0, o1, g0, g1, g2, g3, h0, h1, h2, h3):
    for j in range(x0.shape[0]):
        v0, v1, v2, v3 = _f32(x0[j]), _f32(x1[j]), _f32(x2[j]), _f32(x3[j])
        o0[j] += g0 * v0 + g1 * v1 + g2 * v2 + g3 * v3
        o1[j] += h0 * v0 + h1 * v1 + h2 * v2 + h3 * v3


@numba.njit(**_FAST)
def _add1(x0, x1, x2, x3, o0, g0, g1, g2, g3):
    for j in range(x0.shape[0]):
        o0[j] += g0 * _f32(x0[j]) + g1 * _f32(x1[j]) + g2 * _f32(x2[j]) + g3 * _f32(x3[j])


@numba.njit(**_FAST)
def _linear_rows(X, rows, W, b, y, scale, flush, P, G, gs):
    n, k = rows.shape[0], W.shape[0]
    G[:] = 0
    gs[:] = 0
    z = np.empty((4, k), np.float32)
    g = np.empty((4, k), np.float32)
    for s in range(0, n, 4):
        m = min(4, n - s)
        x0, x1, x2, x3 = X[rows[s]], X[rows[s + min(1, m - 1)]], X[rows[s + min(2, m - 1)]], X[rows[s + min(3, m - 1)]]
        for c in range(0, k - 1, 2):
            z[0, c], z[1, c], z[2, c], z[3, c], z[0, c + 1], z[1, c + 1], z[2, c + 1], z[3, c + 1] = _dot2(
                x0, x1, x2, x3, W[c], W[c + 1])
        if k % 2:
            z[0, k - 1], z[1, k - 1], z[2, k - 1], z[3, k - 1] = _dot1(x0, x1, x2, x3, W[k - 1])
        g[m:] = 0  # a last group of fewer than 4 rows repeats its last row, with no weight
        for r in range(m):
            top = -np.inf
            for c in range(k):
                z[r, c] += b[c]
                top = max(top, z[r, c])
            total = np.float32(0.0)
            for c in range(k):
                z[r, c] = np.float32(0.0) if z[r, c] - top < flush else np.float32(math.exp(z[r, c] - top))
                total += z[r, c]
            for c in range(k):
                P[s + r, c] = z[r, c] / total
                g[r, c] = (P[s + r, c] - (np.float32(1.0) if y[s + r] == c else np.float32(0.0))) * scale[s + r]
                gs[c] += g[r, c]
        for c in range(0, k - 1, 2):
            _add2(x0, x1, x2, x3, G[c], G[c + 1], g[0, c], g[1, c], g[2, c], g[3, c], g[0, c + 1], g[1, c + 1],
                  g[2, c + 1], g[3, c + 1])
        if k % 2:
            c = k - 1
            _add1(x0, x1, x2, x3, G[c], g[0, c], g[1, c], g[2, c], g[3, c])


def linear_rows(X: np.ndarray, rows: np.ndarray, W: np.ndarray, b: np.ndarray, y: np.ndarray, scale: np.ndarray,
                flush: float, P: np.ndarray, G: np.ndarray, gs: np.ndarray) -> None:
    """A linear softmax head's forward and backward pass over `rows` of X (n, d), float16 or float32, 4 rows at a
    time kept in the core's cache for both passes: logits x @ W.T + b (W (k, d)), probabilities into P (len(rows),
    k) (those below exp(flush) of the row's largest taken as 0), and the gradient of sum(scale * cross-entropy)
    into G (k, d) and gs (k,). y, scale: the rows' class indices and weights (len(rows),)."""
    _linear_rows(X.view(np.uint16) if X.dtype == np.float16 else X, rows, W, b, y, scale, np.float32(flush), P, G, gs)
