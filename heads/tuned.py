"""A head that includes block 5 of the body: conv5_1..3 (the last ones trained), pool5, then a dense head.

It reads `pool4`, cached like any layer, so fine-tuning the top of the body never runs blocks 1-4 again. It is
trained by pipeline.tune (PyTorch); here it is plain arrays, and it runs as an ONNX graph in onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from headstart.export.errors import DataError
from headstart.export.graph import IR_VERSION, OPSET

from .base import NORM_EPS

if TYPE_CHECKING:
    import onnxruntime

POOLINGS = ("gap", "flatten")  # after pool5: its global average (512), or all of it flattened (512 * s * s)


def dense_nodes(x: str, mean: np.ndarray, scale: np.ndarray, layers: list, prefix: str = "head.",
                normalize: bool = False) -> tuple[list, list, str]:
    """ONNX nodes of a dense head on the 2-D float32 tensor `x`: (L2-normalize rows,) standardize, Gemm (+ReLU
    between); the logits."""
    inits = [numpy_helper.from_array(mean.astype(np.float32), f"{prefix}mean"),
             numpy_helper.from_array(scale.astype(np.float32), f"{prefix}scale")]
    nodes = []
    if normalize:  # x / max(|x|, eps), as models.l2_normalize
        inits.append(numpy_helper.from_array(np.array(NORM_EPS, np.float32), f"{prefix}eps"))
        nodes += [helper.make_node("ReduceL2", [x], [f"{prefix}norm"], axes=[1], keepdims=1),
                  helper.make_node("Max", [f"{prefix}norm", f"{prefix}eps"], [f"{prefix}norm_eps"]),
                  helper.make_node("Div", [x, f"{prefix}norm_eps"], [f"{prefix}unit"])]
        x = f"{prefix}unit"
    nodes += [helper.make_node("Sub", [x, f"{prefix}mean"], [f"{prefix}centered"]),
             helper.make_node("Div", [f"{prefix}centered", f"{prefix}scale"], [f"{prefix}h0"])]
    h = f"{prefix}h0"
    for i, (W, b) in enumerate(layers):
        inits += [numpy_helper.from_array(W.astype(np.float32), f"{prefix}W{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"{prefix}b{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"{prefix}W{i}", f"{prefix}b{i}"], [f"{prefix}z{i}"]))
        h = f"{prefix}z{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [h], [f"{prefix}a{i}"]))
            h = f"{prefix}a{i}"
    return nodes, inits, h


class TunedHead:
    """conv5_1..3 (+ReLU), pool5, `pooling`, then standardize and dense layers, softmax over `classes_`.

    Fitted attributes: `classes_`, `side` (pool4's side), `convs_` [(W (512, 512, 3, 3), b)] x 3, `unfreeze`
    (how many of the last convs were trained), `pooling`, `mean_`, `scale_`, `layers_`, `history_`, `meta_`.
    `predict_proba(X)` takes pool4 features flattened: (n, 512 * side * side).
    """

    def __init__(self, unfreeze: int = 1, pooling: str = "gap", hidden: tuple[int, ...] = ()) -> None:
        self.unfreeze, self.pooling, self.hidden = unfreeze, pooling, tuple(hidden)

    def get_params(self) -> dict:
        return {"unfreeze": self.unfreeze, "pooling": self.pooling, "hidden": self.hidden}

    @property
    def n_features_in_(self) -> int:
        return 512 * self.side * self.side

    def onnx_nodes(self, x: str, prefix: str = "head.") -> tuple[list, list, str]:
        """Nodes from `x`, pool4 as (N, 512, s, s) float32, to the logits."""
        nodes, inits = [], []
        for i, (W, b) in enumerate(self.convs_, start=1):
            name = f"{prefix}conv5_{i}"
            inits += [numpy_helper.from_array(W.astype(np.float32), f"{name}.w"),
                      numpy_helper.from_array(b.astype(np.float32), f"{name}.b")]
            nodes += [helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.pre"], pads=[1, 1, 1, 1],
                                       kernel_shape=[3, 3]),
                      helper.make_node("Relu", [f"{name}.pre"], [name])]
            x = name
        nodes.append(helper.make_node("MaxPool", [x], [f"{prefix}pool5"], kernel_shape=[2, 2], strides=[2, 2]))
        x = f"{prefix}pool5"
        if self.pooling == "gap":
            nodes.append(helper.make_node("GlobalAveragePool", [x], [f"{prefix}gap4d"]))
            x = f"{prefix}gap4d"
        nodes.append(helper.make_node("Flatten", [x], [f"{prefix}flat"]))
        dense, dense_inits, logits = dense_nodes(f"{prefix}flat", self.mean_, self.scale_, self.layers_, prefix)
        return nodes + dense, inits + dense_inits, logits

    def _session(self) -> onnxruntime.InferenceSession:
        """The head as an onnxruntime session, built once."""
        if getattr(self, "_ort", None) is None:
            from headstart.export.runtime import open_session

            shape = helper.make_tensor_value_info("pool4", TensorProto.FLOAT, ["N", 512 * self.side * self.side])
            reshape = numpy_helper.from_array(np.array([-1, 512, self.side, self.side], np.int64), "pool4.shape")
            nodes, inits, logits = self.onnx_nodes("pool4.4d")
            nodes = [helper.make_node("Reshape", ["pool4", "pool4.shape"], ["pool4.4d"]), *nodes,
                     helper.make_node("Softmax", [logits], ["probabilities"], axis=1)]
            out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(self.classes_)])
            graph = helper.make_graph(nodes, "tuned_head", [shape], [out], [reshape, *inits])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
            self._ort = open_session(model.SerializeToString(), "cpu", quiet=True)
        return self._ort

    def predict_proba(self, X: np.ndarray, batch: int = 256) -> np.ndarray:
        """Class probabilities (n, n_classes) from pool4 features (n, 512 * side * side)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise DataError(f"X has shape {X.shape}; this head reads pool4 as (n, {self.n_features_in_})")
        session = self._session()
        return np.concatenate([session.run(["probabilities"], {"pool4": X[i:i + batch].astype(np.float32)})[0]
                               for i in range(0, len(X), batch)]) if len(X) else np.zeros((0, len(self.classes_)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]
