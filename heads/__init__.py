"""The middle layer: heads as scikit-learn estimators on plain arrays, their files, and bundling into ONNX.

Nothing here knows the feature cache; `headstart.pipeline` feeds these estimators from it. Names are imported
on first use (PEP 562), so reading a head file's metadata does not import scikit-learn.
"""

from headstart.export.lazy import attach

_WHERE = {"HeadFileError": ".headfile", "load_head": ".headfile", "save_head": ".headfile", "KINDS": ".kinds",
          "LogisticHead": ".models", "MLPHead": ".models", "SoftmaxHead": ".models", "AutoHead": ".auto",
          "KNNHead": ".knn", "MLPRegressorHead": ".adam_tasks", "SigmoidHead": ".adam_tasks"}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = attach(__name__, _WHERE)
