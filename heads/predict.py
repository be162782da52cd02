"""Predictions of a bundled classifier over image files, as CSV rows."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np

from export.runtime import open_session
from pipeline.dataset import scan
from pipeline.decode import load_or_reason

from .bundle import classifier_metadata


def predict(images: str | Path, model: str | Path, batch_size: int = 32, jobs: int = 2, device: str = "auto",
            clip: tuple[float, float] | None = None, quiet: bool = False) -> Iterator[dict]:
    """One dict per file of `images` (a folder in any headstart layout, or a CSV manifest), in scan order:
    id, path, label, a probability per class, and error (the reason a file could not be used, else '')."""
    meta = classifier_metadata(model)
    classes, size, resize = meta["classes"], int(meta["image_size"]), meta.get("resize", "squash")
    paths = scan(images).paths
    session = open_session(model, device, quiet=quiet)

    with ThreadPoolExecutor(jobs) as pool:
        it = iter(zip(paths, pool.map(lambda p: load_or_reason(p, size, resize), paths), strict=True))
        while batch := list(islice(it, batch_size)):
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
    """Write rows; returns (count, bad rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, bad = 0, []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "label", *classes, "path", "error"])
        w.writeheader()
        for row in rows:
            w.writerow(row)
            n += 1
            if row["error"]:
                bad.append(row)
    return n, bad
