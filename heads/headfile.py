"""The head file: an .npz of plain arrays plus JSON metadata, never a pickle, checked whole when loaded.

Arrays: `mean`, `scale` (D,), then `W0`, `b0`, `W1`, `b1`, ... of the dense layers. JSON (`meta`): the
estimator's kind, parameters and classes, and `info`, what the trainer recorded beside it (task, layer,
the body's fingerprint, rows, metrics), which comes back as the estimator's `meta_`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from headstart.export.files import atomic_write

from .models import KINDS, DenseHead
from .tuned import POOLINGS, TunedHead

FORMAT = "headstart-head/2"


class HeadFileError(ValueError):
    """A head file that cannot be used."""


def save_head(head: DenseHead | TunedHead, path: str | Path) -> Path:
    """Write a fitted head as a head file, atomically: an .npz of plain arrays plus JSON, never a pickle.

    Parameters
    ----------
    head : DenseHead or TunedHead
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
    kind = "tuned" if isinstance(head, TunedHead) else next(k for k, cls in KINDS.items() if type(head) is cls)
    meta = {"format": FORMAT, "kind": kind, "params": head.get_params(), "classes": head.classes_.tolist(),
            "n_features": int(head.n_features_in_), "info": getattr(head, "meta_", {})}
    arrays = {"mean": head.mean_, "scale": head.scale_}
    if isinstance(head, TunedHead):
        meta["side"] = head.side
        for i, (W, b) in enumerate(head.convs_, start=1):
            arrays[f"conv5_{i}.w"], arrays[f"conv5_{i}.b"] = W, b
    for i, (W, b) in enumerate(head.layers_):
        arrays[f"W{i}"], arrays[f"b{i}"] = W, b
    with atomic_write(path) as partial, open(partial, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    return Path(path)


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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    kind, params, classes = meta.get("kind"), meta.get("params"), meta.get("classes")
    if kind not in KINDS and kind != "tuned":
        raise bad(f"unknown head kind {kind!r}")
    if not isinstance(params, dict) or not isinstance(meta.get("info", {}), dict):
        raise bad("params and info must be mappings")
    if "hidden" in params:
        params["hidden"] = tuple(params["hidden"])
    try:
        head = TunedHead(**params) if kind == "tuned" else KINDS[kind](**params)
    except TypeError as e:
        raise bad(f"parameters {sorted(params)} do not fit a {kind} head ({e})") from None
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(map(str, classes))) != len(classes)
            or not (all(isinstance(c, str) for c in classes) or all(isinstance(c, int) for c in classes))):
        raise bad(f"classes must be 2 or more distinct names, got {classes!r}")
    d = meta.get("n_features")
    if not isinstance(d, int) or d < 1:
        raise bad(f"n_features {d!r} is not a positive integer")
    n_layers = len(getattr(head, "hidden", ())) + 1
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
    sizes = [width, *(int(h) for h in getattr(head, "hidden", ())), len(classes)]
    for i in range(n_layers):
        expected[f"W{i}"], expected[f"b{i}"] = (sizes[i], sizes[i + 1]), (sizes[i + 1],)
    if set(arrays) != set(expected):
        raise bad(f"arrays {sorted(arrays)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        a = arrays[name]
        if a.shape != shape or a.dtype.kind != "f" or not np.isfinite(a).all():
            raise bad(f"{name} is {a.dtype} {a.shape}, expected finite floats of shape {shape}")
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
    return head
