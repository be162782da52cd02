"""`evaluate --predictions`: one CSV row per scored image, for scripts and a user's own analysis."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from headstart.export.files import atomic_write

from .cache import FeatureCache


def write_predictions(path: str | Path, cache: str | Path, dataset: str | None, paths: np.ndarray, y: np.ndarray,
                      proba: np.ndarray, classes: list[str]) -> int:
    """Write path, split, true label, predicted label and one probability column per class; returns the rows.

    The split is each image's own split in the cache (a held-out share of train reads `train`).
    """
    fc = FeatureCache(cache, dataset)
    split_of = dict(zip(fc.paths.tolist(), fc.splits.tolist(), strict=True))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["path", "split", "label", "predicted", *(f"p_{c}" for c in classes)])
    for p, t, row in zip(paths.tolist(), y.tolist(), proba, strict=True):
        w.writerow([p, split_of.get(p, ""), classes[t], classes[int(row.argmax())], *(f"{v:.6f}" for v in row)])
    with atomic_write(path) as tmp:
        tmp.write_text(out.getvalue())
    return len(paths)
