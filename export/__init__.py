"""The bottom layer: the frozen VGG16 body as an ONNX model (architecture, weights, graph, runtime).

Names are imported on first use (PEP 562), so a light submodule (vgg, files, progress) does not pull in
onnx and onnxruntime.
"""

from .lazy import attach

_WHERE = {"IncompatibleError": ".fingerprint", "body_fingerprint": ".fingerprint", "compatible": ".fingerprint",
          "features_fingerprint": ".fingerprint", "build_body": ".graph", "read_metadata": ".graph", "save": ".graph",
          "DeviceError": ".runtime", "open_session": ".runtime", "DEFAULT_LAYERS": ".vgg", "LAYERS": ".vgg",
          "layer_shape": ".vgg", "Weights": ".weights", "WeightsError": ".weights", "load_weights": ".weights"}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = attach(__name__, _WHERE)
