"""`evaluate --reliability`: the reliability diagram of a head's probabilities, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headstart.export.files import atomic_write
from headstart.heads.metrics import expected_calibration_error

BINS = 15  # as the expected calibration error that evaluate reports


def reliability_bins(y: np.ndarray, proba: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per bin of confidence (the top probability; `bins` equal bins of [0, 1]) that holds rows: its edges, row
    count, mean confidence and accuracy."""
    confidence, correct = proba.max(1), proba.argmax(1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [{"low": b / bins, "high": (b + 1) / bins, "n": int((which == b).sum()),
             "confidence": float(confidence[which == b].mean()), "accuracy": float(correct[which == b].mean())}
            for b in np.unique(which)]


def plot_reliability(y: np.ndarray, proba: np.ndarray, path: str | Path, title: str, bins: int = BINS) -> None:
    """Accuracy against confidence per bin (bars), the diagonal of perfect calibration, and each bin's share of
    the rows; the title carries the expected calibration error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = reliability_bins(y, proba, bins)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    centres = [(b["low"] + b["high"]) / 2 for b in found]
    top.bar(centres, [b["accuracy"] for b in found], width=1 / bins, edgecolor="black", label="accuracy")
    top.plot([b["confidence"] for b in found], [b["accuracy"] for b in found], "o", color="tab:red",
             label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title}\nECE {expected_calibration_error(y, proba, bins):.4f} ({bins} bins, {len(y)} rows)",
                  fontsize=9)
    bottom.bar(centres, [b["n"] / len(y) for b in found], width=1 / bins, edgecolor="black")
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("share of rows")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
