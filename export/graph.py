"""The frozen VGG16 body as an ONNX graph: uint8 NHWC RGB images in, named activations out."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError, UsageError
from .files import atomic_write
from .metadata import META_PREFIX, model_metadata
from .vgg import DEFAULT_LAYERS, FC_SIZE, LAST, LAYERS, SHALLOW_GAPS, STAGES, check_image_size, layer_shape
from .weights import Weights

# torchvision trained these weights on RGB in [0, 1] normalised with these statistics.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DTYPES = ("float32", "float16")
OPSET = 17
IR_VERSION = 8  # onnxruntime 1.20+ reads it; newer onnx releases write IR versions it refuses


def headstart_version() -> str:
    try:
        return version("headstart")
    except PackageNotFoundError:
        return "unknown"


def _dtype(dtype: str) -> tuple[int, type]:
    if dtype == "float32":
        return TensorProto.FLOAT, np.float32
    if dtype == "float16":
        return TensorProto.FLOAT16, np.float16
    raise UsageError(f"dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")


def body_nodes(weights: Weights, layers: tuple[str, ...], image_size: int, dtype: str,
               prefix: str = "") -> tuple[list, list[onnx.TensorProto]]:
    """Nodes and initializers that turn the uint8 `images` input into the requested layers.

    `prefix` keeps the names apart where the body is part of a larger graph.
    """
    check_image_size(image_size)
    unknown = [x for x in layers if x not in LAYERS]
    if unknown or not layers:
        raise UsageError(f"unknown layer(s) {unknown or '(none)'}; choose from {', '.join(LAYERS)}")
    if any(x in ("fc6", "fc7") for x in layers):
        if weights.fc is None:
            raise UsageError(f"fc6/fc7 need the classifier layers, which {weights.source} does not have; "
                             "use --weights with torchvision or timm safetensors/npz, or --source hf")
        if image_size != FC_SIZE:
            raise UsageError(f"fc6/fc7 need --image-size {FC_SIZE}: the classifier reads pool5 at that size")
    elem, np_dtype = _dtype(dtype)
    p = prefix
    inits: list[onnx.TensorProto] = []
    nodes: list = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np_dtype), p + name))
        return p + name

    scale = const("scale", (1.0 / (255.0 * np.array(STD))).reshape(1, 3, 1, 1))
    shift = const("shift", (-np.array(MEAN) / np.array(STD)).reshape(1, 3, 1, 1))
    nodes += [
        helper.make_node("Cast", ["images"], [p + "x_float"], to=elem),
        helper.make_node("Transpose", [p + "x_float"], [p + "x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", [p + "x_nchw", scale], [p + "x_scaled"]),
        helper.make_node("Add", [p + "x_scaled", shift], [p + "x_norm"]),
    ]
    x, params = p + "x_norm", iter(weights.convs)
    for stage in STAGES:
        out = p + stage.name
        if stage.kind == "conv":
            w, b = next(params)
            nodes += [
                helper.make_node("Conv", [x, const(f"{stage.name}.w", w), const(f"{stage.name}.b", b)],
                                 [out + "_pre"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
                helper.make_node("Relu", [out + "_pre"], [out]),
            ]
        else:
            nodes.append(helper.make_node("MaxPool", [x], [out], kernel_shape=[2, 2], strides=[2, 2]))
        x = out
    for gap, stage in (("gap", LAST), *SHALLOW_GAPS.items()):
        if gap in layers:
            nodes += [helper.make_node("GlobalAveragePool", [p + stage.name], [p + gap + "_4d"]),
                      helper.make_node("Flatten", [p + gap + "_4d"], [p + gap])]
    if "fc6" in layers or "fc7" in layers:
        (w6, b6), (w7, b7) = weights.fc
        nodes += [
            helper.make_node("Flatten", [p + LAST.name], [p + "pool5_flat"]),
            helper.make_node("Gemm", [p + "pool5_flat", const("fc6.w", w6), const("fc6.b", b6)], [p + "fc6_pre"],
                             transB=1),
            helper.make_node("Relu", [p + "fc6_pre"], [p + "fc6"]),
            helper.make_node("Gemm", [p + "fc6", const("fc7.w", w7), const("fc7.b", b7)], [p + "fc7_pre"], transB=1),
            helper.make_node("Relu", [p + "fc7_pre"], [p + "fc7"]),
        ]
    return nodes, inits


def images_input(image_size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", image_size, image_size, 3])


def make_model(graph: onnx.GraphProto, metadata: dict[str, str], like: onnx.ModelProto | None = None
               ) -> onnx.ModelProto:
    """A checked model of `graph` with headstart's metadata; `like`: the model whose opsets and IR version it
    keeps (a wrapped body's are its exporter's)."""
    opsets = list(like.opset_import) if like is not None else [helper.make_opsetid("", OPSET)]
    ir_version = max(IR_VERSION, like.ir_version) if like is not None else IR_VERSION
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version,
                              producer_name="headstart", producer_version=headstart_version())
    helper.set_model_props(model, {META_PREFIX + k: str(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=False)
    return model


def body_metadata(weights: Weights, image_size: int, layers: tuple[str, ...], dtype: str) -> dict[str, str]:
    return {
        "kind": "body",
        "weights_source": weights.source,
        "weights_sha256": weights.sha256,
        "trained": "false" if weights.source.startswith("random:") else "true",
        "image_size": str(image_size),
        "preprocessing": json.dumps({"input": "uint8 NHWC RGB", "scale": "1/255", "mean": MEAN, "std": STD,
                                     "layout": "NCHW"}),
        "layers": ",".join(layers),
        "dtype": dtype,
        "version": headstart_version(),
    }


def build_body(weights: Weights, image_size: int = 224, layers: tuple[str, ...] = DEFAULT_LAYERS,
               dtype: str = "float32") -> onnx.ModelProto:
    """VGG16 body, preprocessing inside: `images` uint8 (N, S, S, 3) -> one output per layer, one pass.

    Outputs: conv5_3 (N, 512, S/16, S/16), pool5 (N, 512, S/32, S/32), gap (N, 512), gap1-gap4 (N, 64 to 512,
    the averages of pool1-pool4), fc6/fc7 (N, 4096).
    """
    layers = tuple(dict.fromkeys(layers))
    elem, _ = _dtype(dtype)
    nodes, inits = body_nodes(weights, layers, image_size, dtype)
    outputs = [helper.make_tensor_value_info(x, elem, ["N", *layer_shape(x, image_size)]) for x in layers]
    graph = helper.make_graph(nodes, "vgg16_body", [images_input(image_size)], outputs, inits)
    return make_model(graph, body_metadata(weights, image_size, layers, dtype))


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically so that an interrupted export never leaves a half model under the final name."""
    with atomic_write(path) as partial:
        onnx.save(model, str(partial))
    return Path(path)


def output_shapes(meta: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each output of a body, from its metadata: a wrapped model records them at export
    (`shapes`), a VGG16 body's follow from its image size."""
    if "shapes" in meta:
        return {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
    size = int(meta["image_size"])
    return {x: layer_shape(x, size) for x in meta["layers"].split(",")}


def read_metadata(path: str | Path) -> dict[str, str]:
    """Headstart's metadata_props of a model, without the prefix, read without parsing its weights."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model; run `headstart export -o {path}` first")
    return model_metadata(path)
