"""The bottom layer: the frozen VGG16 body as an ONNX model (architecture, weights, graph, runtime)."""

from .fingerprint import IncompatibleError, body_fingerprint, compatible, features_fingerprint
from .graph import build_body, read_metadata, save
from .runtime import DeviceError, open_session
from .vgg import DEFAULT_LAYERS, LAYERS, layer_shape
from .weights import Weights, WeightsError, load_weights

__all__ = ["DEFAULT_LAYERS", "LAYERS", "DeviceError", "IncompatibleError", "Weights", "WeightsError",
           "body_fingerprint", "build_body", "compatible", "features_fingerprint", "layer_shape", "load_weights",
           "open_session", "read_metadata", "save"]
