"""Headstart: transfer learning on images, fast.

Run the frozen ImageNet body (VGG16, as ONNX) once, cache its activations, train heads on the cache in seconds,
and bundle body and head back into one ONNX classifier.

Everything a notebook needs is here, imported on first use so that ``import headstart`` stays quick:

- ``export_body``, ``extract``, ``FeatureCache``: the body and the feature cache.
- ``AutoHead``, ``SoftmaxHead``, ``LogisticHead``, ``MLPHead``, ``KNNHead``, ``train_head``, ``save_head``,
  ``load_head``: heads.
- ``Target``, ``TagHead``, ``RidgeHead``: tasks of several tags or of a number an image, on the same cache.
- ``bundle``, ``predict``, ``Predictions``: the classifier file and its predictions.
- ``HeadstartError`` and its kinds (``CacheError``, ``HeadFileError``, ``IncompatibleError``, ``WeightsError``,
  ``DeviceError``, ``UsageError``, ``DataError``, ``ModelError``, ``BusyError``): what a caller may catch; each
  says what went wrong and what to do. Any other exception is a bug in headstart.

Examples
--------
>>> import headstart as hs
>>> hs.export_body("models/vgg16.onnx")  # doctest: +SKIP
>>> cache = hs.extract("data/digits", "models/vgg16.onnx", "cache/features.zarr")  # doctest: +SKIP
>>> X, y = cache.xy("gap")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headstart.export.lazy import attach

# name -> the module defining it; nothing is imported until a name is first asked for (PEP 562).
_NAMES = {
    "export_body": "headstart.pipeline.api",
    "wrap_body": "headstart.pipeline.api",
    "extract": "headstart.pipeline.api",
    "bundle": "headstart.pipeline.api",
    "predict": "headstart.pipeline.api",
    "Predictions": "headstart.pipeline.api",
    "FeatureCache": "headstart.pipeline.cache",
    "train_head": "headstart.pipeline.train",
    "SoftmaxHead": "headstart.heads.models",
    "LogisticHead": "headstart.heads.models",
    "MLPHead": "headstart.heads.models",
    "AutoHead": "headstart.heads.auto",
    "KNNHead": "headstart.heads.knn",
    "TagHead": "headstart.heads.tags",
    "RidgeHead": "headstart.heads.regression",
    "Target": "headstart.pipeline.targets",
    "save_head": "headstart.heads.headfile",
    "load_head": "headstart.heads.headfile",
    **{name: "headstart.export.errors" for name in (
        "HeadstartError", "UsageError", "DataError", "ModelError", "CacheError", "HeadFileError", "IncompatibleError",
        "WeightsError", "DeviceError", "BusyError")},
}
_SUBPACKAGES = ("export", "heads", "pipeline")

__all__ = [  # the keys of _NAMES and __version__ (a test checks they agree)
    "AutoHead", "BusyError", "CacheError", "DataError", "DeviceError", "FeatureCache", "HeadFileError",
    "HeadstartError", "IncompatibleError", "KNNHead", "LogisticHead", "MLPHead", "ModelError", "Predictions",
    "RidgeHead", "SoftmaxHead", "TagHead", "Target", "UsageError", "WeightsError", "__version__", "bundle",
    "export_body", "extract", "load_head", "predict", "save_head", "train_head", "wrap_body",
]

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports on demand
    from headstart.export.errors import (
        BusyError,
        CacheError,
        DataError,
        DeviceError,
        HeadFileError,
        HeadstartError,
        IncompatibleError,
        ModelError,
        UsageError,
        WeightsError,
    )
    from headstart.heads.auto import AutoHead
    from headstart.heads.headfile import load_head, save_head
    from headstart.heads.knn import KNNHead
    from headstart.heads.models import LogisticHead, MLPHead, SoftmaxHead
    from headstart.heads.regression import RidgeHead
    from headstart.heads.tags import TagHead
    from headstart.pipeline.api import Predictions, bundle, export_body, extract, predict, wrap_body
    from headstart.pipeline.cache import FeatureCache
    from headstart.pipeline.targets import Target
    from headstart.pipeline.train import train_head

    __version__: str


def _version() -> str:
    from importlib.metadata import version

    return version("headstart")


__getattr__, __dir__ = attach(__name__, _NAMES, _SUBPACKAGES, {"__version__": _version})
