"""The middle layer: heads as scikit-learn estimators on plain arrays, their files, and bundling into ONNX.

Nothing here knows the feature cache; `headstart.pipeline` feeds these estimators from it.
"""

from .headfile import HeadFileError, load_head, save_head
from .models import KINDS, LogisticHead, MLPHead, SoftmaxHead

__all__ = ["KINDS", "HeadFileError", "LogisticHead", "MLPHead", "SoftmaxHead", "load_head", "save_head"]
