"""The middle layer: heads as scikit-learn estimators on plain arrays, their files, and bundling into ONNX.

Nothing here knows the feature cache; `headstart.pipeline` feeds these estimators from it.
"""

from .models import KINDS, LogisticHead, MLPHead, SoftmaxHead  # isort: skip (KINDS first, then filled)
from .auto import AutoHead
from .headfile import HeadFileError, load_head, save_head
from .knn import KNNHead

# Registered here, where every import of this layer passes first: models cannot import the modules built on it.
KINDS.update(knn=KNNHead, auto=AutoHead)

__all__ = ["KINDS", "AutoHead", "HeadFileError", "KNNHead", "LogisticHead", "MLPHead", "SoftmaxHead", "load_head",
           "save_head"]
