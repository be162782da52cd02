"""The compute helpers under the Adam heads: a thread pool for the compiled loops, onnxruntime's gather and
products, the one-pass standardization statistics, and the content hash that holds rows out.

Nothing here is an estimator: these take arrays and buffers, and know nothing of classes or labels.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnxruntime


def rows_per_block(d: int, itemsize: int, budget: int = 64 * 2**20) -> int:
    """Rows of a temporary (rows, d) block within `budget` bytes: 4,096 gap rows, 334 float64 pool5 rows."""
    return max(1, min(4096, budget // (d * itemsize)))


@np.errstate(invalid="ignore", over="ignore")  # NaN and infinity are reported from the result (DenseHead)
def mean_std(blocks: Iterable[np.ndarray], d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (float64, (d,)) of row blocks, in one pass.

    Sub-blocks of at most 64 MB are widened to float32 (float16 sums overflow), centred on their own mean before
    squaring and merged in float64 (Chan et al.), so a spread small beside the mean is not lost to cancellation.
    """
    n, mean, m2 = 0, np.zeros(d), np.zeros(d)
    rows, widen = rows_per_block(d, 4), Widen(d)
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


def row_hashes(block: np.ndarray) -> np.ndarray:
    """(n,) float64 in [0, 1): each row's content hash (of its values as float32), the same for equal rows
    whatever their position or storage type, so a held-out share never depends on the rows' order."""
    rows = np.ascontiguousarray(block, np.float32)
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        out[i] = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") / 2.0**64
    return out


def share(jobs: list[Callable[[], object]]) -> None:
    """Run the jobs at once, the first in this thread and the others in the pool's."""
    others = [_pool(os.getpid()).submit(job) for job in jobs[1:]]
    jobs[0]()
    for f in others:
        f.result()


def cores() -> int:
    """Count the cores this process may run on, at most 8 (past that, memory, not cores, bounds the loops)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """Threads that share the compiled loops' work out among the cores (the loops let go of the GIL).

    One pool per process, since a forked child's copy of its parent's pool has no threads and would wait forever.
    """
    return ThreadPoolExecutor(max(1, cores() - 1), thread_name_prefix="headstart-heads")


class Widen:
    """`source[rows]` as float32, into a buffer: a minibatch gathered and widened in one pass.

    float16 goes through onnxruntime's Gather and Cast on every core, faster than numpy's take and widening
    (docs/benchmarks.md, "Head training speed").
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


class Product:
    """(a.T if trans_a else a) @ (b.T if trans_b else b), into `out` where given.

    By onnxruntime's Gemm for large operands, else numpy. Its threads sleep between calls, so the cores are free
    for the threads that run in between (Adam's, the widening's), where OpenBLAS's spin on for a while after each
    call.
    """

    def __init__(self, large: bool) -> None:
        self.sessions: dict[tuple[bool, bool], onnxruntime.InferenceSession] | None = {} if large else None

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


def _gather_session(d: int) -> onnxruntime.InferenceSession:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Gather", ["x", "rows"], ["picked"], axis=0),
                               helper.make_node("Cast", ["picked"], ["y"], to=TensorProto.FLOAT)], "widen",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", d]),
                               helper.make_tensor_value_info("rows", TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", d])])
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _gemm_session(trans_a: bool, trans_b: bool) -> onnxruntime.InferenceSession:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Gemm", ["a", "b"], ["y"], transA=int(trans_a), transB=int(trans_b))],
                              "product", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"{n}0", f"{n}1"])
                                          for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", "n"])])
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Its threads must not spin between calls: other threads (numpy's, Adam's) need the same cores right after.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
