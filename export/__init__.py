"""Build the frozen VGG16 body as an ONNX model from real ImageNet weights, preprocessing inside."""

from .graph import DEFAULT_LAYERS, LAYERS, build_body, layer_shape, read_metadata, save
from .runtime import DeviceError, open_session
from .weights import Weights, WeightsError, load_weights

__all__ = ["DEFAULT_LAYERS", "LAYERS", "DeviceError", "Weights", "WeightsError", "build_body", "layer_shape",
           "load_weights", "open_session", "read_metadata", "save"]
