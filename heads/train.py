"""Training heads on a feature cache: tasks, row selection, and the head file (npz + JSON, never a pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipeline.cache import FeatureCache

from .models import KINDS, Head, MLPHead

FORMAT = "headstart-head/1"


def read_classes_map(path: str | Path | None) -> dict[str, str | None] | None:
    """A YAML or JSON mapping of the cache's class names to the task's labels (null leaves a class out)."""
    if path is None:
        return None
    import yaml

    try:
        mapping = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the classes map ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str | type(None)) for v in mapping.values()):
        raise ValueError(f"{path}: a classes map is a mapping of class name -> task label (or null to leave out)")
    return {str(k): v for k, v in mapping.items()}


def task_labels(classes: list[str], labels: np.ndarray, mapping: dict[str, str | None] | None
                ) -> tuple[list[str], np.ndarray]:
    """Task classes and per-entry task labels (-1 for entries outside the task)."""
    if mapping is None:
        return list(classes), labels.copy()
    unknown = sorted(set(mapping) - set(classes))
    if unknown:
        raise ValueError(f"classes map names {', '.join(unknown)}, which the cache does not have "
                         f"(it has {', '.join(classes)})")
    task_classes = sorted({v for v in mapping.values() if v is not None})
    lookup = np.array([task_classes.index(mapping[c]) if mapping.get(c) is not None else -1 for c in classes]
                      + [-1])  # the last slot serves label -1 (unlabelled)
    return task_classes, lookup[labels]


def select_rows(fc: FeatureCache, y: np.ndarray, selection: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) entry indices. Without a valid split, a seeded stratified fraction of train is held out."""
    labelled = y >= 0
    train = np.flatnonzero((fc.splits == selection["train_split"]) & labelled)
    valid = np.flatnonzero((fc.splits == selection["valid_split"]) & labelled)
    if len(train) == 0:
        raise ValueError(f"{fc.path}: no labelled rows in split {selection['train_split']!r} "
                         f"(splits: {', '.join(sorted(set(fc.splits)))})")
    if len(valid) == 0 and selection["valid_fraction"] > 0:
        from sklearn.model_selection import train_test_split

        train, valid = train_test_split(train, test_size=selection["valid_fraction"], random_state=selection["seed"],
                                        stratify=y[train])
        train, valid = np.sort(train), np.sort(valid)
    return train, valid


def train_head(cache: str | Path, layer: str = "gap", kind: str = "softmax", *, dataset: str | None = None,
               task: str | None = None, classes_map: dict[str, str | None] | None = None,
               train_split: str = "train", valid_split: str = "valid", valid_fraction: float = 0.2, seed: int = 0,
               log=None, **params) -> Head:
    """Fit a head of `kind` on the cached `layer` features; returns it with `meta_` (what the head file keeps)."""
    if kind not in KINDS:
        raise ValueError(f"unknown head {kind!r}; choose from {', '.join(KINDS)}")
    fc = FeatureCache(cache, dataset)
    classes, y = task_labels(fc.classes, fc.labels, classes_map)
    selection = {"dataset": fc.dataset, "train_split": train_split, "valid_split": valid_split,
                 "valid_fraction": valid_fraction, "seed": seed, "classes_map": classes_map}
    train, valid = select_rows(fc, y, selection)
    X_train = fc.features(layer, train, np.float16 if fc.attrs.get("dtype") == "float16" else np.float32)
    X_valid = fc.features(layer, valid)
    head = KINDS[kind](seed=seed, **params)
    head.fit(X_train, y[train], X_valid, y[valid], log=log, n_classes=len(classes))
    last = head.history_[-1]
    head.meta_ = {
        "format": FORMAT, "kind": kind, "task": task or fc.dataset, "classes": classes, "layer": layer,
        "input_dim": int(X_train.shape[1]),
        "model": {k: fc.model[k] for k in ("weights_source", "weights_sha256", "image_size")}
        | {"resize": fc.attrs["resize"]},
        "selection": selection, "params": _params(head),
        "rows": {"train": int(len(train)), "valid": int(len(valid))},
        "metrics": {k: v for k, v in last.items() if k != "epoch"},
    }
    return head


def _params(head: Head) -> dict:
    keys = ["standardize", "class_weight", "seed", "l2"]
    if isinstance(head, MLPHead):
        keys += ["hidden", "dropout", "epochs", "lr", "batch_size"]
    return {k: getattr(head, k) for k in keys if hasattr(head, k)}


def save_head(head: Head, path: str | Path) -> Path:
    """npz of plain arrays plus the JSON metadata; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mean": head.mean_, "scale": head.scale_}
    for i, (W, b) in enumerate(head.layers_):
        arrays[f"W{i}"], arrays[f"b{i}"] = W, b
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(head.meta_)), **arrays)
    os.replace(partial, path)
    return path


def load_head(path: str | Path) -> Head:
    """A fitted head from its file; `meta_` holds classes, layer, the body's fingerprint and metrics."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such head file; train one with `headstart train`")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: not a headstart head file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a headstart head file (format {meta.get('format')!r})")
    head = Head()
    head.mean_, head.scale_ = arrays["mean"], arrays["scale"]
    head.layers_ = [(arrays[f"W{i}"], arrays[f"b{i}"]) for i in range(len(arrays) // 2 - 1)]
    head.n_classes_ = len(meta["classes"])
    head.meta_ = meta
    return head


def check_compatible(head: Head, model: dict, layer_source: str) -> None:
    """A head only makes sense on features of the body and layer it was trained on."""
    want = head.meta_["model"]
    for key in ("weights_sha256", "image_size"):
        if str(model.get(key)) != str(want[key]):
            raise ValueError(f"this head was trained on features of another model ({key} {want[key]}, "
                             f"{layer_source} has {model.get(key)}); retrain it on this model's features")
