"""Any ONNX image model as a headstart body: the user's graph behind headstart's uint8 NHWC RGB input.

The wrapped model keeps the body contract of the VGG16 one (`images` uint8 (N, S, S, 3), the preprocessing inside
the graph, a dynamic batch, one float output per layer). Its layers are graph outputs or intermediate tensors of
the source model, each kept whole or pooled to a vector. The source file's sha256, the preprocessing and the
outputs go into its metadata, hence into the fingerprint of its features. One module past 400 lines: choosing
tensors, preprocessing, pooling and the checks on the result are the steps of one graph rewrite, read in order.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelError, UsageError
from .files import file_digest
from .metadata import META_PREFIX

PRESETS = {  # mean, std on [0, 1] pixels, in RGB order
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
LAYOUTS = ("nchw", "nhwc")
CHANNELS = ("rgb", "bgr")
SCALES = (1, 255)
POOLS = ("gap", "cls", "mean")  # gap: mean over a 4D map's H, W; cls: token 0 of (N, T, C); mean: over T
MAX_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit on one serialized model, less room for headstart's nodes
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a layer's name is a cache array's name
_FLOATS = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
_P = "headstart_pre/"
PROBE = 3  # images in the test run at export: exporters trace with 1 or 2 and can bake that batch in


@dataclass(frozen=True)
class Output:
    """One layer of a wrapped body: `name` in the cache, read from `tensor`, pooled by `pool` (None: whole)."""

    name: str
    tensor: str
    pool: str | None = None

    def spec(self) -> str:
        return self.name + ("" if self.tensor == self.name else f"={self.tensor}") + (f":{self.pool}" if self.pool
                                                                                        else "")


def parse_outputs(text: str) -> list[Output]:
    """`NAME[=TENSOR][:POOL],...` as Outputs; a POOL suffix is recognised only when it is one of POOLS, so tensor
    names with colons (tf2onnx's `dense/BiasAdd:0`) stay whole."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        pool = None
        head, _, tail = item.rpartition(":")
        if head and tail in POOLS:
            item, pool = head, tail
        name, eq, tensor = item.partition("=")
        out.append(Output(name.strip(), (tensor if eq else name).strip(), pool))
    if not out:
        raise UsageError(f"no outputs in {text!r}; give NAME[=TENSOR][:POOL],... with POOL one of {', '.join(POOLS)}")
    return out


def load_source(path: Path) -> tuple[onnx.ModelProto, list[Path]]:
    """The ONNX model at `path` without its external data, and the external data files it names."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own: the file is not a model
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model (its graph has no nodes)")
    files = sorted({path.parent / e.value for t in onnx.external_data_helper._get_all_tensors(model)
                    if t.data_location == TensorProto.EXTERNAL for e in t.external_data if e.key == "location"})
    return model, files


def _with_data(path: Path, model: onnx.ModelProto, files: list[Path]) -> onnx.ModelProto:
    """Load external data into the model where the whole fits one file; refuse where it cannot."""
    if not files:
        return model
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{path}: its external data file(s) {', '.join(missing)} are missing; keep them beside it")
    total = path.stat().st_size + sum(f.stat().st_size for f in files)
    if total > MAX_BYTES:
        raise ModelError(f"{path}: {total / 2**30:.1f} GiB with its external data, over the 2 GiB a headstart body "
                         "can hold in one file (protobuf's limit); wrap a smaller model, or export this one at "
                         "float16 (half the bytes)")
    onnx.load_external_data_for_model(model, str(path.parent))
    return model


def source_sha256(path: Path, files: list[Path]) -> str:
    """The file's sha256; with external data, the sha256 of the file's and each data file's sha256 in turn."""
    if not files:
        return file_digest(path)
    return hashlib.sha256("".join(file_digest(f) for f in [path, *files]).encode()).hexdigest()


def _tensors(model: onnx.ModelProto) -> dict[str, str]:
    """Every tensor a node computes, with the op that computes it (graph outputs included)."""
    return {o: n.op_type for n in model.graph.node for o in n.output if o}


def _input(path: Path, model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{path}: {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a body takes one "
                         "image tensor: export the image model alone")
    x = inputs[0]
    t = x.type.tensor_type
    if t.elem_type not in _FLOATS or len(t.shape.dim) != 4:
        raise ModelError(f"{path}: input {x.name!r} is {_shape(x)} of type {TensorProto.DataType.Name(t.elem_type)}; "
                         "a body needs a 4D float32 or float16 image input")
    return x


def _shape(v: onnx.ValueInfoProto) -> str:
    dims = v.type.tensor_type.shape.dim
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + ")"


def _image_size(path: Path, x: onnx.ValueInfoProto, layout: str, image_size: int | None) -> int:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in x.type.tensor_type.shape.dim]
    c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
    if c not in (None, 3):
        other = "nhwc" if layout == "nchw" else "nchw"
        raise ModelError(f"{path}: input {x.name!r} {_shape(x)} has {c} channels in {layout} layout; "
                         f"an RGB image has 3: is its layout {other}?")
    fixed = {v for v in (h, w) if v is not None}
    if len(fixed) == 2 or (fixed and None in (h, w)):
        raise ModelError(f"{path}: input {x.name!r} {_shape(x)} is not square; headstart feeds square images")
    if fixed:
        side = fixed.pop()
        if image_size not in (None, side):
            raise UsageError(f"{path}: input {x.name!r} {_shape(x)} takes {side} px images, not {image_size}; "
                             f"use image size {side}")
        return side
    size = image_size or 224
    if size < 1:
        raise UsageError(f"image size {size}: must be at least 1 pixel")
    return size


def _stats(mean: tuple[float, ...] | None, std: tuple[float, ...] | None, preset: str | None
           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if preset is not None:
        if preset not in PRESETS:
            raise UsageError(f"preset {preset!r}: use one of {', '.join(PRESETS)}")
        if mean is not None or std is not None:
            raise UsageError(f"preset {preset!r} sets the mean and std: give the preset or mean and std, not both")
        return PRESETS[preset]
    mean, std = tuple(mean or (0.0, 0.0, 0.0)), tuple(std or (1.0, 1.0, 1.0))
    for what, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, 3):
            raise UsageError(f"{what} {','.join(map(str, v))}: give 1 or 3 values (one per channel)")
    mean, std = (mean * 3)[:3], (std * 3)[:3]
    if any(s <= 0 for s in std):
        raise UsageError(f"std {','.join(map(str, std))}: every value must be above 0")
    return mean, std


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _reduce_mean(model: onnx.ModelProto, x: str, axes: list[int], out: str, inits: list) -> onnx.NodeProto:
    if _opset(model) >= 18:  # axes became an input in opset 18
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), out + "/axes"))
        return helper.make_node("ReduceMean", [x, out + "/axes"], [out], keepdims=0)
    return helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=0)


def _pool_nodes(model: onnx.ModelProto, o: Output, layout: str, inits: list) -> list:
    src = o.tensor
    if o.pool is None:
        return [] if o.name == o.tensor else [helper.make_node("Identity", [src], [o.name])]
    if o.pool == "gap" and layout == "nchw":
        return [helper.make_node("GlobalAveragePool", [src], [o.name + "/gap4d"]),
                helper.make_node("Flatten", [o.name + "/gap4d"], [o.name])]
    if o.pool == "gap":
        return [_reduce_mean(model, src, [1, 2], o.name, inits)]
    if o.pool == "mean":
        return [_reduce_mean(model, src, [1], o.name, inits)]
    inits.append(numpy_helper.from_array(np.array(0, np.int64), o.name + "/cls_index"))
    return [helper.make_node("Gather", [src, o.name + "/cls_index"], [o.name], axis=1)]


def _check_outputs(path: Path, model: onnx.ModelProto, outputs: list[Output]) -> None:
    tensors = _tensors(model)
    taken = set(tensors) | {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    names = [o.name for o in outputs]
    for o in outputs:
        if o.tensor not in tensors:
            close = difflib.get_close_matches(o.tensor, list(tensors), 5, 0.5)
            graph_outputs = ", ".join(g.name for g in model.graph.output)
            raise UsageError(f"{path}: no tensor {o.tensor!r}; its outputs are {graph_outputs}"
                             + (f", the closest names {', '.join(close)}" if close else "")
                             + f"; `headstart info {path}` lists all {len(tensors)} tensors")
        if not NAME.match(o.name):
            raise UsageError(f"layer name {o.name!r} (tensor {o.tensor!r}): name it NAME={o.tensor} with NAME of "
                             "letters, digits, _ . - (it names the layer in the cache)")
        if o.pool is not None and o.name in taken:
            raise UsageError(f"layer name {o.name!r} is already a tensor of {path}: give the pooled layer another "
                             f"name, e.g. {o.name}_{o.pool}={o.tensor}:{o.pool}")
        if o.pool is None and o.name != o.tensor and o.name in taken:
            raise UsageError(f"layer name {o.name!r} is already a tensor of {path}: choose another name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"layer name(s) {', '.join(dup)} given twice: each layer needs its own name")


def _probe(path: Path, model: onnx.ModelProto, outputs: list[Output], size: int) -> dict[str, np.ndarray]:
    """Run the wrapped graph on two images: the real shapes of every output, and proof that the batch is dynamic."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    x = np.random.default_rng(0).integers(0, 256, (PROBE, size, size, 3), dtype=np.uint8)
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = session.run([o.name for o in outputs], {"images": x})
    except Exception as e:  # onnxruntime's own Fail/InvalidArgument types
        raise ModelError(f"{path} does not run on a batch of {PROBE} images of {size}x{size} px "
                         f"({str(e).splitlines()[0][:300]}); export it with a dynamic batch dimension "
                         "(torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})) and check its image size"
                         ) from None
    result = {}
    for o, y in zip(outputs, outs, strict=True):
        if isinstance(y, np.ndarray) and y.ndim >= 1 and len(y) != PROBE and y.dtype in (np.float32, np.float16):
            raise ModelError(f"{path}: tensor {o.tensor!r} is {y.shape} on a batch of {PROBE} images: the model "
                             "keeps the batch size it was exported with; export it with a dynamic batch dimension "
                             "(torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))")
        if not isinstance(y, np.ndarray) or y.dtype not in (np.float32, np.float16) or y.ndim < 1 or len(y) != PROBE:
            what = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
            raise UsageError(f"{path}: tensor {o.tensor!r} is {what} on {PROBE} images, not float features per image "
                             "(batch first): pick another tensor")
        result[o.name] = y
    return result


def _pool_rank(path: Path, o: Output, shape: tuple[int, ...]) -> None:
    want = {"gap": 4, "cls": 3, "mean": 3}.get(o.pool)
    if want is not None and len(shape) != want:
        raise UsageError(f"{path}: tensor {o.tensor!r} has shape {shape} on {PROBE} images; pool {o.pool} needs "
                         f"{'a 4D map (N, C, H, W)' if want == 4 else 'a token sequence (N, T, C)'}: keep it whole "
                         "or pick another tensor")


def wrap_onnx(path: str | Path, *, image_size: int | None = None, mean: tuple[float, ...] | None = None,
              std: tuple[float, ...] | None = None, preset: str | None = None, layout: str = "nchw",
              channels: str = "rgb", scale: int = 1, outputs: list[Output] | None = None) -> onnx.ModelProto:
    """A user's ONNX image model as a headstart body.

    Parameters
    ----------
    path : str or Path
        The ONNX model: one 4D float image input; external data beside it is embedded (up to 2 GiB in all).
    image_size : int, optional
        The square input side; the model's own where its input is fixed, else 224.
    mean, std : tuple of float, optional
        Per-channel statistics in the model's channel order, in units of `scale` (default 0 and 1).
    preset : {"imagenet", "clip", "inception"}, optional
        Named mean and std instead (on [0, 1] pixels).
    layout : {"nchw", "nhwc"}
        The model's input layout; `gap` pools axes 2, 3 (nchw) or 1, 2 (nhwc).
    channels : {"rgb", "bgr"}
        The model's channel order.
    scale : {1, 255}
        The model's pixel range before mean and std: [0, 1] or [0, 255].
    outputs : list of Output, optional
        The layers (default: the graph outputs, each kept whole).

    Returns
    -------
    onnx.ModelProto
        The body, with headstart metadata: the source's sha256, the preprocessing, the layers' tensors, pools and
        per-image shapes, and the model's GFLOP per image where they can be counted.
    """
    from .graph import headstart_version

    path = Path(path)
    if layout not in LAYOUTS or channels not in CHANNELS or scale not in SCALES:
        raise UsageError(f"layout {layout!r}, channels {channels!r}, scale {scale!r}: use layout "
                         f"{'|'.join(LAYOUTS)}, channels {'|'.join(CHANNELS)}, scale {'|'.join(map(str, SCALES))}")
    mean, std = _stats(mean, std, preset)
    model, files = load_source(path)
    if any(p.key == META_PREFIX + "kind" for p in model.metadata_props):
        raise ModelError(f"{path} is already a headstart model; use it as it is")
    sha = source_sha256(path, files)
    model = _with_data(path, model, files)
    if model.functions:  # exporters' local functions: a plain graph is what bundle and quantize extend
        model = onnx.inliner.inline_local_functions(model)
    g = model.graph
    x = _input(path, model)
    size = _image_size(path, x, layout, image_size)
    elem = x.type.tensor_type.elem_type
    outputs = outputs or [Output(o.name, o.name) for o in g.output]
    _check_outputs(path, model, outputs)

    # uint8 NHWC RGB -> float -> channel order -> (v * scale / 255 - mean) / std -> layout, named as the old input
    np_dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    mul = np.array([scale / 255.0 / s for s in std], np_dtype).reshape(1, 1, 1, 3)
    add = np.array([-m / s for m, s in zip(mean, std, strict=True)], np_dtype).reshape(1, 1, 1, 3)
    inits = [numpy_helper.from_array(mul, _P + "mul"), numpy_helper.from_array(add, _P + "add")]
    nodes = [helper.make_node("Cast", ["images"], [_P + "float"], to=elem)]
    v = _P + "float"
    if channels == "bgr":
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), _P + "bgr_index"))
        nodes.append(helper.make_node("Gather", [v, _P + "bgr_index"], [_P + "bgr"], axis=3))
        v = _P + "bgr"
    nodes.append(helper.make_node("Mul", [v, _P + "mul"], [_P + "scaled"]))
    if layout == "nchw":
        nodes += [helper.make_node("Add", [_P + "scaled", _P + "add"], [_P + "nhwc"]),
                  helper.make_node("Transpose", [_P + "nhwc"], [x.name], perm=[0, 3, 1, 2])]
    else:
        nodes.append(helper.make_node("Add", [_P + "scaled", _P + "add"], [x.name]))
    pools: list = []
    for o in outputs:
        pools += _pool_nodes(model, o, layout, inits)
    g.input.remove(x)
    g.input.insert(0, helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3]))
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old + pools)
    g.initializer.extend(inits)
    del g.value_info[:]  # the exporter's shapes may fix the batch at 1; onnxruntime infers its own
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(o.name, elem, None) for o in outputs)
    # pooling is checked on the raw tensors first, so a wrong pool gets its own message rather than a runtime error
    raw = [Output(o.tensor, o.tensor) for o in outputs if o.pool]
    if raw:
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        del probe.graph.output[:]
        probe.graph.output.extend(helper.make_tensor_value_info(o.name, elem, None) for o in raw)
        got = _probe(path, probe, list({o.name: o for o in raw}.values()), size)
        for o in outputs:
            if o.pool:
                _pool_rank(path, o, got[o.tensor].shape)
    got = _probe(path, model, outputs, size)
    shapes = {o.name: list(got[o.name].shape[1:]) for o in outputs}
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(o.name, elem if got[o.name].dtype == np_dtype else
                                                  (TensorProto.FLOAT16 if got[o.name].dtype == np.float16
                                                   else TensorProto.FLOAT), ["N", *shapes[o.name]])
                    for o in outputs)
    gflop = count_gflop(model)
    meta = {
        "kind": "body", "weights_source": f"onnx:{path.name}",
        "weights_sha256": sha, "trained": "unknown", "image_size": str(size),
        "preprocessing": json.dumps({"input": "uint8 NHWC RGB", "channels": channels, "scale": f"{scale}/255",
                                     "mean": list(mean), "std": list(std), "layout": layout.upper()}),
        "layers": ",".join(o.name for o in outputs),
        "outputs": json.dumps({o.name: o.spec() for o in outputs}),
        "shapes": json.dumps(shapes), "dtype": _FLOATS[elem], "version": headstart_version(),
        "source": json.dumps({"file": path.name, "sha256": sha, "producer": f"{model.producer_name} "
                              f"{model.producer_version}".strip(), "opset": _opset(model)}),
    } | ({"gflop": f"{gflop:.6g}"} if gflop is not None else {})
    del model.metadata_props[:]
    helper.set_model_props(model, {META_PREFIX + k: str(v) for k, v in meta.items()})
    model.producer_name, model.producer_version = "headstart", headstart_version()
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"{path}: the wrapped model does not check ({str(e).splitlines()[0][:300]})") from None
    return model


def count_gflop(model: onnx.ModelProto) -> float | None:
    """Forward GFLOP per image of the Conv, MatMul and Gemm nodes (2 per multiply-add), from the shapes of their
    tensors on one image as onnxruntime computes them (onnx's inference loses them behind reshapes); None when
    the model has none of these nodes or does not run."""
    import onnxruntime as ort

    ops = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    names = list(dict.fromkeys(x for n in ops for x in (*n.input[:2], n.output[0]) if x not in inits))
    if not ops:
        return None
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(x) for x in names if x not in known)
    size = probe.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as named
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = session.run(names, {"images": np.zeros((1, size, size, 3), np.uint8)})
    except Exception:  # onnxruntime's own error types: no count rather than a failed export
        return None
    shapes = inits | {x: list(y.shape) for x, y in zip(names, outs, strict=True)}
    total = 0
    for n in ops:
        out, a, b = shapes[n.output[0]], shapes[n.input[0]], shapes[n.input[1]]
        if n.op_type == "Conv":
            group = next((at.i for at in n.attribute if at.name == "group"), 1)
            macs = int(np.prod(out)) * (a[1] // group) * int(np.prod(b[2:]))
        elif n.op_type == "MatMul":
            macs = int(np.prod(out)) * a[-1]
        else:
            trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
            macs = int(np.prod(out)) * a[0 if trans_a else -1]
        total += 2 * macs
    return total / 1e9


def describe_onnx(path: str | Path) -> dict:
    """What `headstart info` shows of an ONNX model that is not a headstart one: its input and the tensors a
    body can expose (name, shape, op), for choosing layers."""
    path = Path(path)
    model, files = load_source(path)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a custom op stops inference: the names still help
        inferred = model
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    inits = {i.name for i in model.graph.initializer}
    ops = _tensors(model)
    return {
        "file": str(path), "kind": "ONNX model (not a headstart body: wrap it with `headstart export --onnx`)",
        "producer": f"{model.producer_name} {model.producer_version}".strip(), "opset": _opset(model),
        "external_data": ", ".join(str(f) for f in files) or "none",
        "inputs": [f"{i.name} {_shape(i)} {TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()}"
                   for i in model.graph.input if i.name not in inits],
        "outputs": [f"{o.name} {_shape(known.get(o.name, o))}" for o in model.graph.output],
        "tensors": [f"{name} {_shape(known[name]) if name in known else '(?)'} {op}" for name, op in ops.items()],
    }
