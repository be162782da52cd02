"""Hyper-parameter sweeps on one feature cache: every combination costs seconds, not a pass of the body."""

from __future__ import annotations

import inspect
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from headstart.heads.models import KINDS, DenseHead

from .train import train_head


def trials(layers: list[str], kinds: list[str], grid: dict[str, list]) -> list[tuple[str, str, dict]]:
    """(layer, kind, params) for every combination; a kind gets only the parameters it takes, so a logistic
    head is not trained once per learning rate."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or not layers:
        raise ValueError(f"sweep needs layers and heads from {', '.join(KINDS)}; got heads {kinds}")
    out = []
    for layer, kind in itertools.product(layers, kinds):
        accepted = inspect.signature(KINDS[kind]).parameters
        names = [n for n in grid if n in accepted and grid[n]]
        combos = {tuple(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))}
        out += [(layer, kind, dict(c)) for c in sorted(combos)]
    return out


def sweep(cache: str | Path, layers: list[str], kinds: list[str], grid: dict[str, list], *, jobs: int = 1,
          **options: object) -> tuple[list[dict], DenseHead]:
    """Train every combination with `train_head` (the same as `headstart train`, `options` passed on).

    Returns the rows sorted by validation accuracy, then log loss (layer, head, params, valid_accuracy,
    valid_loss, seconds), and the best head.
    """
    plan = trials(layers, kinds, grid)

    def run(trial: tuple[str, str, dict]) -> tuple[dict, DenseHead]:
        layer, kind, params = trial
        t0 = time.perf_counter()
        head = train_head(cache, layer, kind, **options, **params)
        m = head.meta_["metrics"]
        return {"layer": layer, "head": kind, "params": params, "valid_accuracy": m.get("valid_accuracy"),
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
    return (-(row["valid_accuracy"] or 0.0), row["valid_loss"] if row["valid_loss"] is not None else float("inf"))
