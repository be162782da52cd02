"""Scoring a head on cached features: metrics JSON, a confusion matrix as CSV and PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.cache import FeatureCache

from .models import Head
from .train import check_compatible, select_rows, task_labels


def metrics(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, log loss, per-class precision/recall and the confusion matrix (rows: actual)."""
    pred = proba.argmax(1)
    k = len(classes)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, pred), 1)
    per_class = {}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        per_class[c] = {"precision": float(tp / cm[:, i].sum()) if cm[:, i].sum() else 0.0,
                        "recall": float(tp / cm[i].sum()) if cm[i].sum() else 0.0, "support": int(cm[i].sum())}
    p_true = np.clip(proba[np.arange(len(y)), y], 1e-15, 1.0)
    return {"accuracy": float((pred == y).mean()), "log_loss": float(-np.log(p_true).mean()), "n": int(len(y)),
            "per_class": per_class, "confusion_matrix": cm.tolist()}


def evaluate(cache: str | Path, head: Head, split: str | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Score `head` on the rows it was validated on (or on `split`): (metrics, y, predictions)."""
    meta = head.meta_
    sel = meta["selection"]
    fc = FeatureCache(cache, sel["dataset"])
    check_compatible(head, fc.model, str(fc.path))
    layer = meta["layer"]
    if layer not in fc.layers:
        raise ValueError(f"{fc.path} has no {layer!r} features, which this head takes")
    classes, y = task_labels(fc.classes, fc.labels, sel["classes_map"])
    if classes != meta["classes"]:
        raise ValueError(f"the task's classes in {fc.path} ({classes}) differ from the head's ({meta['classes']})")
    if split is None:
        _, rows = select_rows(fc, y, sel)
    else:
        rows = np.flatnonzero((fc.splits == split) & (y >= 0))
    if len(rows) == 0:
        raise ValueError(f"{fc.path}: no labelled rows to evaluate on (split {split or sel['valid_split']!r})")
    proba = head.predict_proba(fc.features(layer, rows))
    result = metrics(y[rows], proba, classes)
    result.update({"task": meta["task"], "head": meta["kind"], "layer": layer,
                   "split": split or (sel["valid_split"] if (fc.splits == sel["valid_split"]).any() else
                                      f"held-out {sel['valid_fraction']} of {sel['train_split']}")})
    return result, y[rows], proba.argmax(1)


def write_reports(result: dict, y: np.ndarray, pred: np.ndarray, metrics_path: Path | None,
                  confusion_csv: Path | None, confusion_png: Path | None) -> None:
    """Metrics JSON for `dvc metrics` (the matrix kept out: it is not a scalar), confusion plots for `dvc plots`."""
    classes = list(result["per_class"])
    if metrics_path:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        flat = {k: v for k, v in result.items() if k != "confusion_matrix"}
        metrics_path.write_text(json.dumps(flat, indent=2) + "\n")
    if confusion_csv:
        confusion_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(confusion_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["actual", "predicted"])
            w.writerows((classes[a], classes[p]) for a, p in zip(y, pred, strict=True))
    if confusion_png:
        confusion_png.parent.mkdir(parents=True, exist_ok=True)
        plot_confusion(np.array(result["confusion_matrix"]), classes, confusion_png,
                       f"{result['task']} ({result['head']} on {result['layer']}): accuracy {result['accuracy']:.3f}")


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * max(k, 4), 1 + 0.5 * max(k, 4)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=90 if k > 6 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title, fontsize=9)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
