"""Predictions of a bundled classifier over image files, as CSV rows."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from headstart.export.files import atomic_write
from headstart.export.runtime import open_session
from headstart.heads.bundle import classifier_metadata

from .dataset import scan
from .reader import read_batches


def predict(images: str | Path, model: str | Path, batch_size: int = 32, jobs: int = 2, device: str = "auto",
            clip: tuple[float, float] | None = None, quiet: bool = False) -> Iterator[dict]:
    """One dict per file of `images` (a folder in any headstart layout, or a CSV manifest), in scan order:
    id, path, label, a probability per class, and error (the reason a file could not be used, else '').

    Images are decoded as the classifier's fingerprint says (its image size and resize policy).
    """
    meta = classifier_metadata(model)
    classes, fingerprint = meta["classes"], meta["fingerprint"]
    paths = scan(images).paths
    session = open_session(model, device, quiet=quiet)
    batches = read_batches(((p, p) for p in paths), fingerprint["image_size"], fingerprint["resize"],
                           batch_size, jobs)
    for batch in batches:
        good = [x for _, x in batch if not isinstance(x, str)]
        proba = session.run(["probabilities"], {"images": np.stack(good)})[0] if good else None
        k = 0
        for path, x in batch:
            row = {"id": Path(path).stem, "path": path, "label": "", "error": ""}
            if isinstance(x, str):
                row.update({c: "" for c in classes}, error=x)
            else:
                p = proba[k].astype(np.float64)
                k += 1
                row["label"] = classes[int(p.argmax())]
                if clip:
                    p = np.clip(p, *clip)
                row.update({c: f"{v:.6f}" for c, v in zip(classes, p, strict=True)})
            yield row


def write_csv(rows: Iterator[dict], path: str | Path, classes: list[str]) -> tuple[int, list[dict]]:
    """Write rows, atomically; returns (count, bad rows)."""
    n, bad = 0, []
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "label", *classes, "path", "error"])
        w.writeheader()
        for row in rows:
            w.writerow(row)
            n += 1
            if row["error"]:
                bad.append(row)
    return n, bad
