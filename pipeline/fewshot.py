"""The few-shot curve: every head (and `auto`) trained on N rows a class drawn from a cache's train split, scored
on its valid split. The measurement behind the choice of the default head (docs/heads.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

from headstart.export.errors import DataError
from headstart.heads.auto import AutoHead
from headstart.heads.metrics import wilson
from headstart.heads.models import LogisticHead, MLPHead, SoftmaxHead

from .cache import FeatureCache
from .selection import Selection, task_rows

# What a new user would try, beside `auto`: each estimator with its defaults.
CANDIDATES: dict[str, Callable[[int], object]] = {
    "softmax": lambda seed: SoftmaxHead(random_state=seed),
    "logistic": lambda seed: LogisticHead(random_state=seed),
    "mlp": lambda seed: MLPHead(random_state=seed),
    "sklearn_lr_c1_normalized": lambda seed: make_pipeline(Normalizer(), LogisticRegression(C=1.0, max_iter=2000)),
    "knn5_cosine": lambda seed: KNeighborsClassifier(5, metric="cosine"),
    "auto": lambda seed: AutoHead(random_state=seed),
}


def fewshot(cache: str | Path, layer: str = "gap", sizes: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100),
            draws: int = 5, heads: tuple[str, ...] = tuple(CANDIDATES), dataset: str | None = None, seed: int = 0,
            say: Callable[[str], None] = lambda _: None) -> list[dict]:
    """One row per (size, head): mean valid accuracy over `draws` random draws of `size` training rows a class,
    its spread, and the 95% Wilson interval of one draw's accuracy at the mean (n = the valid rows)."""
    fc = FeatureCache(cache, dataset)
    classes, y, _, train, valid = task_rows(fc, Selection(dataset=fc.dataset, valid_fraction=0.0))
    if len(valid) == 0:
        raise DataError(f"{fc.path}: the few-shot curve needs a valid split to score on")
    X_train, X_valid = fc.features(layer, train, np.float32), fc.features(layer, valid, np.float32)
    y_train, y_valid = y[train], y[valid]
    rows = []
    for size in sizes:
        scores: dict[str, list[float]] = {h: [] for h in heads}
        seconds: dict[str, float] = dict.fromkeys(heads, 0.0)
        for draw in range(draws):
            rng = np.random.default_rng([seed, size, draw])
            pick = np.concatenate([rng.choice(np.flatnonzero(y_train == c), min(size, int((y_train == c).sum())),
                                              replace=False) for c in range(len(classes))])
            for h in heads:
                model = CANDIDATES[h](draw)
                t0 = time.perf_counter()
                if h.startswith("knn") and len(pick) < 5:
                    model.set_params(n_neighbors=len(pick))
                model.fit(X_train[pick], y_train[pick])
                seconds[h] += time.perf_counter() - t0
                scores[h].append(float((model.predict(X_valid) == y_valid).mean()))
        for h in heads:
            mean = float(np.mean(scores[h]))
            low, high = wilson(round(mean * len(valid)), len(valid))
            rows.append({"per_class": size, "head": h, "accuracy": mean, "low": low, "high": high,
                         "std": float(np.std(scores[h])), "seconds": seconds[h] / draws})
        say(f"{size} a class: " + ", ".join(f"{r['head']} {r['accuracy']:.3f}" for r in rows[-len(heads):]))
    return rows
