"""Predictions of a bundled classifier over image files, as CSV rows."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from headstart.export.files import atomic_write
from headstart.export.runtime import open_session
from headstart.heads.bundle import classifier_metadata

from .dataset import Dataset, display, scan
from .reader import read_batches, run_usable


def predict(images: str | Path | Dataset, model: str | Path, batch_size: int = 32, jobs: int = 2,
            device: str = "auto", clip: tuple[float, float] | None = None, quiet: bool = False) -> Iterator[dict]:
    """One dict per file of `images` (a folder in any headstart layout, a CSV manifest, or one already scanned
    with `dataset.scan`), in scan order:
    id, path, label, error (the reason a file could not be used, else '') and `proba` {class: probability}
    (floats; None where the file could not be used).

    Images are decoded as the classifier's fingerprint says (its image size and resize policy).
    """
    meta = classifier_metadata(model)
    paths = (images if isinstance(images, Dataset) else scan(images)).paths
    yield from predict_paths(paths, open_session(model, device, quiet=quiet), meta, batch_size, jobs, clip)


def predict_paths(paths: list[str], session, meta: dict, batch_size: int, jobs: int,
                  clip: tuple[float, float] | None) -> Iterator[dict]:
    """predict's rows for `paths`, with an open session of the classifier whose metadata is `meta`."""
    classes, fingerprint = meta["classes"], meta["fingerprint"]
    batches = read_batches(((p, p, None) for p in paths), fingerprint["image_size"], fingerprint["resize"],
                           batch_size, jobs)
    for batch in batches:
        outs, bad = run_usable(session, ["probabilities"], [(i, x) for i, (_, x, _) in enumerate(batch)])
        k = 0
        for i, (path, _, _) in enumerate(batch):
            row = {"id": display(Path(path).stem), "path": display(path), "label": "", "error": ""}
            if i in bad:
                row.update(proba=dict.fromkeys(classes), error=bad[i])
            else:
                p = outs["probabilities"][k].astype(np.float64)
                k += 1
                row["label"] = classes[int(p.argmax())]
                if clip:
                    p = np.clip(p, *clip)
                row["proba"] = {c: float(v) for c, v in zip(classes, p, strict=True)}
            yield row


FIXED = ("id", "label", "path", "error")


def probability_columns(classes: list[str]) -> dict[str, str]:
    """Column of each class's probability: its name, or `p_` before it where that would clash."""
    used, out = set(FIXED), {}
    for c in classes:
        name = c
        while name in used:
            name = "p_" + name
        used.add(name)
        out[c] = name
    return out


def write_csv(rows: Iterator[dict], path: str | Path, classes: list[str]
              ) -> tuple[int, list[dict], dict[str, list[str]]]:
    """Write rows, atomically: on any error the file at `path` is left as it was.

    Returns (count, rows that could not be predicted, {id: paths} for ids shared by several files).
    """
    n, bad, seen = 0, [], {}
    columns = probability_columns(classes)
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.DictWriter(f, ["id", "label", *columns.values(), "path", "error"])
        w.writeheader()
        for row in rows:
            w.writerow({**{k: row[k] for k in FIXED},
                        **{columns[c]: "" if v is None else f"{v:.6f}" for c, v in row["proba"].items()}})
            seen.setdefault(row["id"], []).append(row["path"])
            n += 1
            if row["error"]:
                bad.append(row)
    return n, bad, {k: v for k, v in seen.items() if len(v) > 1}
