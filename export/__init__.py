"""The bottom layer: the frozen VGG16 body as an ONNX model (architecture, weights, graph, runtime).

Names are imported on first use (PEP 562), so a light submodule (vgg, files, progress) does not pull in
onnx and onnxruntime.
"""

import importlib

_WHERE = {"IncompatibleError": "fingerprint", "body_fingerprint": "fingerprint", "compatible": "fingerprint",
          "features_fingerprint": "fingerprint", "build_body": "graph", "read_metadata": "graph", "save": "graph",
          "DeviceError": "runtime", "open_session": "runtime", "DEFAULT_LAYERS": "vgg", "LAYERS": "vgg",
          "layer_shape": "vgg", "Weights": "weights", "WeightsError": "weights", "load_weights": "weights"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
