"""The head file: an .npz of plain arrays plus JSON metadata, never a pickle, checked whole when loaded.

Arrays: `mean`, `scale` (D,), then `W0`, `b0`, `W1`, `b1`, ... of the dense layers (a k-NN head: `rows` (m, D),
`labels` (m,), `vote_weight` (n_classes,) instead). JSON (`meta`): the estimator's kind, parameters and classes,
and `info`, what the trainer recorded beside it (task, layer, the body's fingerprint, rows, metrics), which comes
back as the estimator's `meta_`. An auto head stores its winner's arrays, and in `auto` the winner's kind and
parameters, the candidates' cross-validation table, how the folds were drawn (their seed) and the temperature;
any other calibrated head its `calibration` (method, rows, temperature). A head of tags or of a value
(`task_kind` tags or value) keeps its fitted arrays by attribute name instead (`coef_`, `thresholds_`, or
`mean_`, `scale_` and `layers_` as W0, b0, ...) and its `outputs`, the tags or the target's name.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from headstart.export.errors import HeadFileError
from headstart.export.files import atomic_write

from .auto import AutoHead
from .base import DenseHead
from .kinds import KINDS, TASK_KINDS, kind_name, task_kind_of
from .knn import KNNHead
from .tuned import POOLINGS, TunedHead

# /3 added the calibration of every head kind; /2 files (no calibration but auto's) still load.
FORMAT = "headstart-head/3"
READABLE = ("headstart-head/2", FORMAT)
# A tags or value head's fitted attributes kept as arrays (`layers_`: W0, b0, W1, ...), by its class.
TASK_ARRAYS = {"TagHead": ("coef_", "intercept_", "thresholds_"), "RidgeHead": ("coef_", "intercept_"),
               "SigmoidHead": ("mean_", "scale_", "layers_", "thresholds_"),
               "MLPRegressorHead": ("mean_", "scale_", "layers_")}


def save_head(head: DenseHead | AutoHead | TunedHead, path: str | Path) -> Path:
    """Write a fitted head as a head file, atomically: an .npz of plain arrays plus JSON, never a pickle.

    Parameters
    ----------
    head : DenseHead, AutoHead or TunedHead
        A fitted head; its `meta_` (what `train_head` recorded: layer, features' fingerprint, metrics) is kept.
    path : str or Path
        Where to write it.

    Returns
    -------
    Path
        `path`.

    Examples
    --------
    >>> hs.save_head(hs.train_head("cache/features.zarr", "gap", "logistic"), "models/digits.head")  # doctest: +SKIP
    PosixPath('models/digits.head')
    """
    if task_kind_of(head) is not None:
        return _save_task(head, path)
    meta = {"format": FORMAT, "kind": _kind(head), "params": head.get_params(), "classes": head.classes_.tolist(),
            "n_features": int(head.n_features_in_), "info": getattr(head, "meta_", {})}
    inner = head
    if isinstance(head, AutoHead):
        inner = head.best_
        meta["auto"] = {"winner": {"kind": _kind(inner), "params": inner.get_params()}, "name": head.winner_,
                        "temperature": float(head.temperature_), "cv": head.cv_, "table": head.cv_results_}
    elif getattr(head, "calibration_", None):
        meta["calibration"] = head.calibration_
    arrays = {"mean": inner.mean_, "scale": inner.scale_}
    if isinstance(head, TunedHead):
        meta["side"] = head.side
        for i, (W, b) in enumerate(head.convs_, start=1):
            arrays[f"conv5_{i}.w"], arrays[f"conv5_{i}.b"] = W, b
    if isinstance(inner, KNNHead):
        arrays |= {"rows": inner.rows_, "labels": inner.labels_, "vote_weight": inner.vote_weight_}
    for i, (W, b) in enumerate(inner.layers_):
        arrays[f"W{i}"], arrays[f"b{i}"] = W, b
    with atomic_write(path) as partial, open(partial, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    return Path(path)


def _save_task(head: object, path: str | Path) -> Path:
    """Write a tags or value head: its fitted arrays by attribute name (`layers_` as W0, b0, ...), its outputs."""
    arrays = {}
    for name in TASK_ARRAYS[type(head).__name__]:
        if name == "layers_":
            arrays |= {f"{p}{i}": a for i, layer in enumerate(head.layers_) for p, a in zip("Wb", layer, strict=True)}
        else:
            arrays[name] = np.asarray(getattr(head, name))
    meta = {"format": FORMAT, "kind": _kind(head), "task_kind": task_kind_of(head),
            "params": head.get_params(), "outputs": [str(o) for o in head.outputs_],
            "n_features": int(head.n_features_in_), "info": getattr(head, "meta_", {}),
            "fitted": {k: float(getattr(head, k)) for k in ("l2_", "alpha_") if hasattr(head, k)},
            "cv": getattr(head, "cv_results_", [])}
    with atomic_write(path) as partial, open(partial, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    return Path(path)


def _load_task(meta: dict, arrays: dict, bad: Callable[[str], HeadFileError]) -> object:
    """Rebuild a tags or value head, refusing arrays that are absent, not finite or of the wrong shapes."""
    task_kind, kind, outputs, d = meta.get("task_kind"), meta.get("kind"), meta.get("outputs"), meta["n_features"]
    cls = TASK_KINDS.get(task_kind, {}).get(kind)
    if cls is None or kind == "auto":
        raise bad(f"unknown {task_kind} head kind {kind!r}")
    if not isinstance(outputs, list) or not outputs or len(set(outputs)) != len(outputs):
        raise bad(f"outputs must be distinct tag or target names, got {outputs!r}")
    names = TASK_ARRAYS[cls.__name__]
    n_layers = sum(1 for k in arrays if k.startswith("W"))
    expected = {n for n in names if n != "layers_"} | ({f"{p}{i}" for i in range(n_layers) for p in "Wb"}
                                                      if "layers_" in names else set())
    if set(arrays) != expected or ("layers_" in names and n_layers < 1):
        raise bad(f"arrays {sorted(arrays)}, expected {sorted(expected) if n_layers else names}")
    for name, a in arrays.items():
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise bad(f"{name} is {a.dtype} {a.shape}, expected finite floats")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    try:
        head = cls(**params)
    except TypeError as e:
        raise bad(f"parameters {sorted(params)} do not fit a {kind} head ({e})") from None
    for name in names:
        if name == "layers_":
            head.layers_ = [(arrays[f"W{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32))
                            for i in range(n_layers)]
        else:
            a = arrays[name]
            setattr(head, name, float(a) if a.ndim == 0 else a)  # as saved: ridge's weights are float64
    for k, v in meta.get("fitted", {}).items():
        setattr(head, k, v)
    head.n_features_in_, head.outputs_, head.cv_results_ = d, outputs, meta.get("cv", [])
    if task_kind == "value":
        head.n_outputs_ = len(outputs)
    if task_kind == "tags":
        head.tags_ = np.array(outputs)
    try:  # the shapes checked whole, by the head's own arithmetic
        out = np.asarray(head.predict(np.zeros((2, d), np.float32)))
    except ValueError as e:
        raise bad(f"its arrays do not fit together ({e})") from None
    if out.shape not in ((2, len(outputs)), (2,) if len(outputs) == 1 and task_kind == "value" else None):
        raise bad(f"it predicts {out.shape[1:] or 'one value'} a row for {len(outputs)} outputs {outputs}")
    return head


def _kind(head: object) -> str:
    return "tuned" if isinstance(head, TunedHead) else kind_name(head)


def load_head(path: str | Path) -> DenseHead:
    """Read a head file back as the fitted estimator, of its own class and parameters.

    Everything is checked before use: a file whose arrays disagree with its metadata is refused here
    (`HeadFileError`), not later inside onnxruntime.

    Parameters
    ----------
    path : str or Path
        A head file written by `save_head` or ``headstart train``.

    Returns
    -------
    DenseHead or TunedHead
        The fitted head; its `meta_` holds what the trainer recorded (task, layer, fingerprint, metrics).

    Examples
    --------
    >>> head = hs.load_head("models/digits.head")  # doctest: +SKIP
    >>> head.meta_["layer"]  # doctest: +SKIP
    'gap'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such head file; train one with `headstart train`")

    def bad(why: str) -> HeadFileError:
        return HeadFileError(f"{path}: not a usable head file: {why}; train it again with `headstart train`")

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE:
        raise bad(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    if meta.get("task_kind") is not None:
        if not isinstance(meta.get("n_features"), int) or meta["n_features"] < 1 or \
                not isinstance(meta.get("params"), dict) or not isinstance(meta.get("info", {}), dict):
            raise bad("n_features must be a positive integer, params and info mappings")
        head = _load_task(meta, arrays, bad)
        head.meta_ = meta.get("info", {})
        return head
    kind, params, classes = meta.get("kind"), meta.get("params"), meta.get("classes")
    if kind not in KINDS and kind != "tuned":
        raise bad(f"unknown head kind {kind!r}")
    if not isinstance(params, dict) or not isinstance(meta.get("info", {}), dict):
        raise bad("params and info must be mappings")
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(map(str, classes))) != len(classes)
            or not (all(isinstance(c, str) for c in classes) or all(isinstance(c, int) for c in classes))):
        raise bad(f"classes must be 2 or more distinct names, got {classes!r}")
    d = meta.get("n_features")
    if not isinstance(d, int) or d < 1:
        raise bad(f"n_features {d!r} is not a positive integer")
    if kind != "auto":
        head = _restore(kind, params, classes, d, meta, arrays, bad)
    else:
        auto = meta.get("auto")
        if not isinstance(auto, dict) or not isinstance(auto.get("winner"), dict):
            raise bad("an auto head needs `auto`: its winner's kind and parameters")
        winner, temperature = auto["winner"], auto.get("temperature")
        if winner.get("kind") not in ("softmax", "logistic", "mlp", "knn") or not isinstance(winner.get("params"),
                                                                                            dict):
            raise bad(f"an auto head's winner must be a softmax, logistic, mlp or knn head, got {winner!r}")
        if not isinstance(temperature, int | float) or not 0 < temperature < float("inf"):
            raise bad(f"an auto head's temperature must be a positive number, got {temperature!r}")
        for name in ("l2_grid", "neighbors"):
            if isinstance(params.get(name), list):
                params[name] = tuple(params[name])
        try:
            head = AutoHead(**params)
        except TypeError as e:
            raise bad(f"parameters {sorted(params)} do not fit an auto head ({e})") from None
        head.best_ = _restore(winner["kind"], dict(winner["params"]), classes, d, meta, arrays, bad)
        head.winner_, head.temperature_ = str(auto.get("name", winner["kind"])), float(temperature)
        head.cv_, head.cv_results_ = auto.get("cv", {}), auto.get("table", [])
        head.classes_, head.n_features_in_, head.history_ = head.best_.classes_, d, []
    head.meta_ = meta.get("info", {})
    return head


def _restore(kind: str, params: dict, classes: list, d: int, meta: dict, arrays: dict,
             bad: Callable[[str], HeadFileError]) -> DenseHead | TunedHead:
    """Rebuild the fitted head of `kind` from its checked arrays."""
    if "hidden" in params:
        params["hidden"] = tuple(params["hidden"])
    try:
        head = TunedHead(**params) if kind == "tuned" else KINDS[kind](**params)
    except TypeError as e:
        raise bad(f"parameters {sorted(params)} do not fit a {kind} head ({e})") from None
    n_layers = 0 if kind == "knn" else len(getattr(head, "hidden", ())) + 1
    expected, width = {}, d
    if kind == "tuned":
        side = meta.get("side")
        if (not isinstance(side, int) or side < 2 or d != 512 * side * side or head.pooling not in POOLINGS
                or head.unfreeze not in (1, 2, 3)):
            raise bad(f"a tuned head needs side >= 2 with n_features 512 * side^2, pooling in {POOLINGS} and "
                      f"unfreeze 1-3; got side {side!r}, n_features {d}, {head.get_params()}")
        head.side = side
        width = 512 if head.pooling == "gap" else 512 * (side // 2) ** 2
        for i in (1, 2, 3):
            expected[f"conv5_{i}.w"], expected[f"conv5_{i}.b"] = (512, 512, 3, 3), (512,)
    expected |= {"mean": (width,), "scale": (width,)}
    if kind == "knn":
        m = arrays["rows"].shape[0] if "rows" in arrays and arrays["rows"].ndim == 2 else 0
        if m < 1:
            raise bad("a k-NN head needs its training rows, `rows` (m, n_features) with m >= 1")
        expected |= {"rows": (m, d), "vote_weight": (len(classes),)}
    sizes = [width, *(int(h) for h in getattr(head, "hidden", ())), len(classes)]
    for i in range(n_layers):
        expected[f"W{i}"], expected[f"b{i}"] = (sizes[i], sizes[i + 1]), (sizes[i + 1],)
    floats = list(expected)  # checked in this order: the first disagreement is the one named
    if kind == "knn":
        expected["labels"] = (m,)
    if set(arrays) != set(expected):
        raise bad(f"arrays {sorted(arrays)}, expected {sorted(expected)}")
    for name in floats:
        a, shape = arrays[name], expected[name]
        if a.shape != shape or a.dtype.kind != "f" or not np.isfinite(a).all():
            raise bad(f"{name} is {a.dtype} {a.shape}, expected finite floats of shape {shape}")
    if kind == "knn":
        labels = arrays["labels"]
        if labels.shape != (m,) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(classes):
            raise bad(f"labels is {labels.dtype} {labels.shape}, expected ({m},) class indices below {len(classes)}")
        head.rows_, head.labels_ = arrays["rows"].astype(np.float32), labels.astype(np.int64)
        head.vote_weight_ = arrays["vote_weight"].astype(np.float32)
    if (arrays["scale"] <= 0).any():
        raise bad("scale has values <= 0")
    head.classes_ = np.array(classes)
    if kind == "tuned":
        head.convs_ = [(arrays[f"conv5_{i}.w"].astype(np.float32), arrays[f"conv5_{i}.b"].astype(np.float32))
                       for i in (1, 2, 3)]
    else:
        head.n_features_in_ = d
    head.mean_, head.scale_ = arrays["mean"].astype(np.float32), arrays["scale"].astype(np.float32)
    head.layers_ = [(arrays[f"W{i}"].astype(np.float32), arrays[f"b{i}"].astype(np.float32))
                    for i in range(n_layers)]
    head.history_ = []
    head.meta_ = meta.get("info", {})
    head.temperature_, head.calibration_ = 1.0, meta.get("calibration")
    if head.calibration_ is not None:
        t = head.calibration_.get("temperature") if isinstance(head.calibration_, dict) else None
        if not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise bad(f"calibration needs a positive temperature, got {head.calibration_!r}")
        head.temperature_ = float(t)
    return head
