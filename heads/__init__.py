"""The middle layer: heads as scikit-learn estimators on plain arrays, their files, and bundling into ONNX.

Nothing here knows the feature cache; `headstart.pipeline` feeds these estimators from it. Names are imported
on first use (PEP 562), so reading a head file's metadata does not import scikit-learn.
"""

import importlib

_WHERE = {"HeadFileError": "headfile", "load_head": "headfile", "save_head": "headfile", "KINDS": "kinds",
          "LogisticHead": "models", "MLPHead": "models", "SoftmaxHead": "models", "AutoHead": "auto",
          "KNNHead": "knn"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
