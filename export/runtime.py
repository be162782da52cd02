"""Opening an onnxruntime session on CUDA when it really works, else on the CPU."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import onnxruntime as ort

from .errors import DeviceError, ModelError
from .progress import LOG

DEVICES = ("auto", "cpu", "cuda")


class Int8Warning(UserWarning):
    """An int8 model whose kernels lose accuracy on this CPU."""


_warned: set[str] = set()  # one warning per process, however many sessions open


def _options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    return opts


def open_session(model: str | Path | bytes, device: str = "auto", threads: int | None = None,
                 quiet: bool = False) -> ort.InferenceSession:
    """An InferenceSession on `device` (auto|cpu|cuda); logs one line naming the provider in use.

    onnxruntime-gpu lists CUDA as available even where its libraries cannot load, then falls back to the
    CPU after printing raw error lines; so the session's real providers are checked, with that noise muted.
    """
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    source = model if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise ModelError(f"{model}: no such model file")
    session, why = None, ""
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        ort.set_default_logger_severity(4)  # the failed library loads print [E:]/[W:] lines otherwise
        try:
            session = ort.InferenceSession(source, _options(threads),
                                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if "CUDAExecutionProvider" not in session.get_providers():
                session, why = None, "its CUDA/cuDNN libraries did not load"
        except Exception as e:  # onnxruntime raises its own Fail type for a provider that cannot start
            session, why = None, str(e).splitlines()[0][:200]
        finally:
            ort.set_default_logger_severity(3)
    elif device == "cuda":
        why = "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    if session is None:
        if device == "cuda":
            raise DeviceError(f"--device cuda is unusable here: {why}; "
                              "install the cuda extra (pip install 'headstart[cuda]') or use --device cpu")
        session = ort.InferenceSession(source, _options(threads), providers=["CPUExecutionProvider"])
    LOG.debug(f"onnxruntime {ort.__version__}: providers available {ort.get_available_providers()}, "
              f"session on {session.get_providers()}")
    if session_device(session) == "cpu":
        _check_int8(session, source if isinstance(source, str) else "this model")
    if not quiet:
        used = session_device(session).upper()
        note = f" (CUDA unusable: {why})" if why and used == "CPU" else ""
        LOG.info(f"onnxruntime: running on {used}{note}")
    return session


def session_device(session: ort.InferenceSession) -> str:
    return "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"


def _check_int8(session: ort.InferenceSession, where: str) -> None:
    """Warn once when an int8 model with full 8-bit weights runs on an x86 CPU without VNNI (its sums saturate)."""
    from .cpu import int8_saturates

    record = session.get_modelmeta().custom_metadata_map.get("headstart.quantization")
    if record is None or "int8" in _warned or json.loads(record).get("weight_bits", 8) <= 7 or not int8_saturates():
        return
    _warned.add("int8")
    warnings.warn(f"{where}: an int8 model with 8-bit weights, on a CPU without VNNI, whose int8 kernels saturate "
                  "(features lose accuracy: cosine to float32 down to 0.87); re-export it with this version of "
                  "headstart (`headstart export --quantize int8`), which keeps weights to 7 bits", Int8Warning,
                  stacklevel=3)
