"""Scores of a head's probabilities, all from scikit-learn: one definition for training logs and evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def loss_and_accuracy(y: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of probabilities (n, k) against class indices y (n,), as scikit-learn's
    log_loss (probabilities clipped to [eps, 1 - eps] of their type) and accuracy_score compute them.

    Computed here: scikit-learn's input checks cost more than an epoch of a small head's training."""
    y = np.asarray(y)
    eps = np.finfo(proba.dtype).eps
    p = np.clip(proba[np.arange(len(y)), y], eps, 1 - eps)
    return float(-np.log(p).astype(np.float64).mean()), float((proba.argmax(1) == y).mean())


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """ECE: over `bins` equal bins of confidence (the top probability), the row-weighted gap between the
    bin's mean confidence and its accuracy."""
    confidence, correct = proba.max(1), proba.argmax(1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += inside.sum() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total / len(y))


def brier(y: np.ndarray, proba: np.ndarray) -> float:
    """The mean over rows of the squared distance between the probabilities and the one-hot truth."""
    return float(((proba - np.eye(proba.shape[1])[y]) ** 2).sum(1).mean())


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval (low, high) of an accuracy of `correct` out of `n`: honest at few rows."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def metrics(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, log loss, n, balanced accuracy, macro F1, expected calibration error (15 bins), Brier score,
    per-class precision/recall/support, and the confusion matrix (rows: actual)."""
    labels = np.arange(len(classes))
    pred = proba.argmax(1)
    loss, accuracy = loss_and_accuracy(y, proba)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    present = support > 0
    return {"accuracy": accuracy, "log_loss": loss, "n": int(len(y)),
            "balanced_accuracy": float(recall[present].mean()), "macro_f1": float(f1[present].mean()),
            "ece": expected_calibration_error(y, proba), "brier": brier(y, proba),
            "per_class": {c: {"precision": float(p), "recall": float(r), "support": int(s)}
                          for c, p, r, s in zip(classes, precision, recall, support, strict=True)},
            "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist()}


def plot_confusion(cm: np.ndarray, classes: list[str], path: str | Path, title: str) -> None:
    """The confusion matrix as a PNG (scikit-learn's ConfusionMatrixDisplay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * max(k, 4), 1 + 0.5 * max(k, 4)), dpi=100)
    ConfusionMatrixDisplay(np.asarray(cm), display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, include_values=k <= 20,
        xticks_rotation="vertical" if k > 6 else "horizontal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
