"""Body + head as one ONNX classifier: uint8 images in, `probabilities` (N, C) and `label` (N,) out; a tags
head's `probabilities` (N, T) and `tags` (N, T) booleans, a value head's `value` (N,) instead.

The classic "pop the last layer, add Dense(softmax)" as a file any onnxruntime runs, headstart or not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from headstart.export.errors import ModelError, UsageError
from headstart.export.fingerprint import body_fingerprint, compatible
from headstart.export.graph import make_model, read_metadata

from .auto import AutoHead
from .base import DenseHead
from .headfile import load_head
from .kinds import task_kind_of
from .knn import KNNHead
from .tuned import TunedHead, dense_nodes


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A half-precision copy of a headstart body: float initializers, the input Cast and the outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                                              init.name))
    for node in g.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
    for out in g.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def _prune(graph: onnx.GraphProto, keep: list[str]) -> None:
    """Drop the nodes and initializers that the kept outputs do not depend on (other layers, fc6/fc7)."""
    needed, nodes = set(keep), []
    for node in reversed(graph.node):
        if needed & set(node.output):
            nodes.append(node)
            needed |= set(node.input)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def bundle(model_path: str | Path, head: DenseHead | AutoHead | TunedHead, dtype: str | None = None
           ) -> onnx.ModelProto:
    """One graph: the body of `model_path`, then the head's standardization, dense layers and softmax (a k-NN
    head: its similarities to the stored rows, TopK and weighted votes; an auto head: its winner's), the logits
    divided by the head's temperature where it is calibrated.

    `head.meta_` says which layer it reads and carries the fingerprint of the features it was trained on.
    The head runs in float32 even in a float16 bundle: it is a few thousand FLOPs per image.
    """
    meta = read_metadata(model_path)
    if meta.get("kind") != "body":
        raise ModelError(f"{model_path}: not a headstart body model; use the model written by `headstart export`")
    info = getattr(head, "meta_", {})
    if "fingerprint" not in info or "layer" not in info:
        raise UsageError("this head does not say which body features it was trained on; train it with "
                         "`headstart train` (in Python: pass hs.bundle the cache= and layer= of the features it was "
                         "fitted on)")
    layer = info["layer"]
    compatible(info["fingerprint"], body_fingerprint(meta), str(model_path), layer)
    model = onnx.load(str(model_path))
    if dtype == "float16" and meta["dtype"] != "float16":
        model = to_float16(model)
    elif dtype == "float32" and meta["dtype"] != "float32":
        raise ModelError(f"{model_path} is a float16 body; export a float32 one for a float32 bundle")
    g = model.graph
    _prune(g, [layer])
    if isinstance(head, TunedHead):  # block 5 of its own, on the body's pool4
        nodes = [helper.make_node("Cast", [layer], ["head.x"], to=TensorProto.FLOAT)]
        more, inits, h = head.onnx_nodes("head.x")
    else:
        nodes = [helper.make_node("Flatten", [layer], ["head.flat"]),
                 helper.make_node("Cast", ["head.flat"], ["head.x"], to=TensorProto.FLOAT)]
        more, inits, h = head_nodes(head, "head.x")
    task_kind = task_kind_of(head)
    if task_kind is None:
        classes = [str(c) for c in head.classes_]
        nodes += [*more, helper.make_node("Softmax", [h], ["probabilities"], axis=1),
                  helper.make_node("ArgMax", [h], ["label"], axis=1, keepdims=0)]
        outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)]),
                   helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])]
    else:
        classes = [str(c) for c in head.outputs_]
        more2, inits2, outputs = _task_outputs(head, task_kind, h, len(classes))
        nodes, inits = [*nodes, *more, *more2], [*inits, *inits2]
    task = info.get("task", "head")
    graph = helper.make_graph(list(g.node) + nodes, f"{task}_classifier", list(g.input), outputs,
                              list(g.initializer) + inits)
    body = {k: v for k, v in meta.items() if k not in ("kind", "layers", "dtype", "shapes")}
    fingerprint = info["fingerprint"] | {"dtype": dtype or meta["dtype"], "layers": [layer]}
    return make_model(graph, body | {
        "kind": "classifier", "classes": json.dumps(classes), "task": task, "layer": layer,
        "task_kind": task_kind or "classes",
        "head": type(head).__name__, "dtype": fingerprint["dtype"], "resize": fingerprint["resize"],
        "fingerprint": json.dumps(fingerprint), "head_metrics": json.dumps(info.get("metrics", {})),
    }, like=model)


def _task_outputs(head: object, task_kind: str, h: str, n: int) -> tuple[list, list, list]:
    """The outputs of a tags head, `probabilities` (N, n) and `tags` (N, n) booleans at each tag's threshold, or
    of a value head, `value` ((N,) for one target, else (N, n)): nodes, initializers, graph outputs."""
    if task_kind == "tags":
        inits = [numpy_helper.from_array(np.asarray(head.thresholds_, np.float32), "head.thresholds")]
        nodes = [helper.make_node("Sigmoid", [h], ["probabilities"]),
                 helper.make_node("GreaterOrEqual", ["probabilities", "head.thresholds"], ["tags"])]
        return nodes, inits, [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n]),
                              helper.make_tensor_value_info("tags", TensorProto.BOOL, ["N", n])]
    if n > 1:
        return [helper.make_node("Identity", [h], ["value"])], [], [
            helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N", n])]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "head.flat_shape")]
    return [helper.make_node("Reshape", [h, "head.flat_shape"], ["value"])], inits, [
        helper.make_tensor_value_info("value", TensorProto.FLOAT, ["N"])]


def head_nodes(head: DenseHead | AutoHead, x: str) -> tuple[list, list, str]:
    """ONNX nodes and initializers from `x`, (N, D) float32 features, to the head's logits (their name)."""
    if task_kind_of(head) is not None:  # tags' logits or the values: dense layers, no temperature
        mean, scale, layers, normalize = head.dense_layers() if hasattr(head, "dense_layers") else (
            head.mean_, head.scale_, head.layers_, False)
        return dense_nodes(x, mean, scale, layers, normalize=normalize)
    inner = head.best_ if isinstance(head, AutoHead) else head
    if isinstance(inner, KNNHead):
        nodes, inits, h = inner.onnx_nodes(x)
    else:
        nodes, inits, h = dense_nodes(x, inner.mean_, inner.scale_, inner.layers_,
                                      normalize=bool(getattr(inner, "normalize", False)))
    # The winner of an auto head is uncalibrated and the auto head holds the temperature; any other head its own.
    temperature = head.temperature_ if isinstance(head, AutoHead) else getattr(head, "temperature_", 1.0)
    if temperature != 1.0:
        inits.append(numpy_helper.from_array(np.array(temperature, np.float32), "head.temperature"))
        nodes.append(helper.make_node("Div", [h, "head.temperature"], ["head.calibrated"]))
        h = "head.calibrated"
    return nodes, inits, h


def bundle_files(model_path: str | Path, head_path: str | Path, dtype: str | None = None) -> onnx.ModelProto:
    return bundle(model_path, load_head(head_path), dtype)


def classifier_metadata(path: str | Path) -> dict:
    """A bundled classifier's metadata, with `classes` and `fingerprint` decoded."""
    meta = read_metadata(path)
    if meta.get("kind") != "classifier":
        raise ModelError(f"{path}: not a headstart classifier; build one with `headstart bundle`")
    meta["classes"] = json.loads(meta["classes"])
    meta["fingerprint"] = json.loads(meta["fingerprint"])
    return meta

