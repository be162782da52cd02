"""Hyper-parameter sweeps on one feature cache: every combination costs seconds, not a pass of the body.

Trials are ranked without reading the rows that `evaluate` reports: by cross-validation on the training rows
(the folds of `AutoHead`, seeded), or on a split the user names (`select_on`); each trial's validation score,
of its head refit on all training rows, is shown beside, never used.
"""

from __future__ import annotations

import inspect
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from headstart.export.errors import DataError, UsageError
from headstart.heads.auto import cross_val_logits, make_folds, oof_scores
from headstart.heads.kinds import KINDS
from headstart.heads.metrics import loss_and_accuracy, wilson
from headstart.heads.models import DenseHead

from .cache import FeatureCache
from .selection import Selection, task_rows
from .train import train_head


def trials(layers: list[str], kinds: list[str], grid: dict[str, list]) -> list[tuple[str, str, dict]]:
    """(layer, kind, params) for every combination; a kind gets only the parameters it takes, so a logistic
    head is not trained once per learning rate."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or not layers:
        raise UsageError(f"sweep needs layers and heads from {', '.join(KINDS)}; got heads {kinds}")
    out = []
    for layer, kind in itertools.product(layers, kinds):
        accepted = inspect.signature(KINDS[kind]).parameters
        names = [n for n in grid if n in accepted and grid[n]]
        combos = {tuple(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))}
        out += [(layer, kind, dict(c)) for c in sorted(combos)]
    return out


def sweep(cache: str | Path, layers: list[str], kinds: list[str], grid: dict[str, list],
          selection: Selection | None = None, *, jobs: int = 1, select_on: str | None = None, folds: int = 5,
          **options: object) -> tuple[list[dict], DenseHead]:
    """Train every combination with `train_head` on the rows of `selection` (the same as `headstart train`,
    `options` passed on).

    Returns the rows sorted by the selection score, accuracy then log loss (layer, head, params, select_accuracy,
    select_loss, valid_accuracy with its 95% Wilson interval valid_low..valid_high, valid_loss, seconds), and the
    best head refit on all training rows. The selection score is out-of-fold on the training rows (`folds`
    stratified folds, seeded by the selection's seed), or, with `select_on`, that split's score of the refit head.
    """
    plan = trials(layers, kinds, grid)
    selection = Selection.take(selection, options)
    seed = selection.seed
    fc = FeatureCache(cache, selection.dataset)
    _, y, _, train, _ = task_rows(fc, selection)
    split, _ = make_folds(y[train], folds, 10**12, seed)
    picked = None
    if select_on is not None:
        picked = np.flatnonzero((fc.splits == select_on) & (y >= 0))
        if len(picked) == 0:
            raise DataError(f"{fc.path}: no labelled rows in split {select_on!r} to select on "
                             f"(splits: {', '.join(sorted(set(fc.splits)))})")
    features = {layer: fc.features(layer, train) for layer in layers} if select_on is None else {}

    def run(trial: tuple[str, str, dict]) -> tuple[dict, DenseHead]:
        layer, kind, params = trial
        t0 = time.perf_counter()
        head = train_head(cache, layer, kind, selection, **options, **params)
        if select_on is None:
            logits = cross_val_logits(lambda: KINDS[kind](random_state=seed, **params), features[layer], y[train],
                                      split)
            loss, accuracy = oof_scores(y[train], logits, split)
        else:
            loss, accuracy = loss_and_accuracy(y[picked], head.predict_proba(fc.features(layer, picked)))
        m, n = head.meta_["metrics"], head.meta_["rows"]["valid"]
        low, high = (None, None) if m.get("valid_accuracy") is None else \
            wilson(int(round(m["valid_accuracy"] * n)), n)
        return {"layer": layer, "head": kind, "params": params, "select_accuracy": accuracy, "select_loss": loss,
                "valid_accuracy": m.get("valid_accuracy"), "valid_low": low, "valid_high": high,
                "valid_loss": m.get("valid_loss"), "seconds": time.perf_counter() - t0}, head

    rows, best = [], None
    with ThreadPoolExecutor(jobs) as pool:
        for row, head in pool.map(run, plan):
            rows.append(row)
            if best is None or _rank(row) < _rank(best[0]):
                best = (row, head)
    rows.sort(key=_rank)
    return rows, best[1]


def _rank(row: dict) -> tuple:
    return -row["select_accuracy"], row["select_loss"]
