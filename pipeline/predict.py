"""Predictions of a bundled classifier over image files, as CSV rows."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from headstart.export.errors import UsageError
from headstart.export.files import atomic_write
from headstart.export.runtime import open_session
from headstart.heads.bundle import classifier_metadata

from .dataset import Dataset, display, scan
from .reader import read_batches, run_usable
from .targets import TAG_SEPARATOR


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


def check_clip(meta: dict, clip: tuple[float, float] | None, classifier: str | Path, option: str = "clip") -> None:
    """Refuse `clip` for a value classifier (metadata `meta`): it clips probabilities, and a value has none."""
    if clip and meta.get("task_kind") == "value":
        raise UsageError(f"{option} clips probabilities; {classifier} predicts a value and has none")


def predict_paths(paths: list[str], session, meta: dict, batch_size: int, jobs: int,
                  clip: tuple[float, float] | None) -> Iterator[dict]:
    """predict's rows for `paths`, with an open session of the classifier whose metadata is `meta`."""
    classes, fingerprint = meta["classes"], meta["fingerprint"]
    kind = meta.get("task_kind", "classes")
    names = {"classes": ["probabilities"], "tags": ["probabilities", "tags"], "value": ["value"]}[kind]
    batches = read_batches(((p, p, None) for p in paths), fingerprint["image_size"], fingerprint["resize"],
                           batch_size, jobs)
    for batch in batches:
        outs, bad = run_usable(session, names, [(i, x) for i, (_, x, _) in enumerate(batch)])
        k = 0
        for i, (path, _, _) in enumerate(batch):
            row = {"id": display(Path(path).stem), "path": display(path), "label": "", "error": bad.get(i, "")}
            if i in bad:
                row.update(proba=dict.fromkeys(classes) if kind != "value" else {}, value=None)
            else:
                row.update(_outputs(kind, classes, outs, k, clip))
                k += 1
            yield row


def _outputs(kind: str, classes: list[str], outs: dict, k: int, clip: tuple[float, float] | None) -> dict:
    """The row's label (the most probable class, or its tags as `cat|bright`), probabilities, or value."""
    if kind == "value":  # a number an image (or one per target)
        v = outs["value"][k].astype(np.float64)
        return {"value": float(v) if v.ndim == 0 else v.tolist(), "proba": {}}
    p = outs["probabilities"][k].astype(np.float64)
    label = (TAG_SEPARATOR.join(c for c, on in zip(classes, outs["tags"][k], strict=True) if on) if kind == "tags"
             else classes[int(p.argmax())])
    if clip:
        p = np.clip(p, *clip)
    return {"label": label, "proba": {c: float(v) for c, v in zip(classes, p, strict=True)}}


FIXED = ("id", "label", "path", "error")


def probability_columns(classes: list[str]) -> dict[str, str]:
    """Column of each class's probability: its name, or `p_` before it where that would clash."""
    used, out = {*FIXED, "tags", "value"}, {}
    for c in classes:
        name = c
        while name in used:
            name = "p_" + name
        used.add(name)
        out[c] = name
    return out


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # the graph's float32, every digit it has
        return f"{value:.9g}"
    return "|".join(f"{v:.9g}" for v in value) if isinstance(value, list) else str(value)


def write_csv(rows: Iterator[dict], path: str | Path, classes: list[str], kind: str = "classes"
              ) -> tuple[int, list[dict], dict[str, list[str]]]:
    """Write rows, atomically: on any error the file at `path` is left as it was. `kind`: the classifier's task
    kind; its second column is the label, the tags (`cat|bright`) or the value.

    Returns (count, rows that could not be predicted, {id: paths} for ids shared by several files).
    """
    n, bad, seen = 0, [], {}
    columns = probability_columns(classes) if kind != "value" else {}
    first = {"classes": "label", "tags": "tags", "value": "value"}[kind]
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.DictWriter(f, ["id", first, *columns.values(), "path", "error"])
        w.writeheader()
        for row in rows:
            given = row.get("value") if kind == "value" else row["label"]
            w.writerow({"id": row["id"], first: _cell(given), "path": row["path"], "error": row["error"],
                        **{columns[c]: "" if v is None else f"{v:.6f}" for c, v in row["proba"].items()}})
            seen.setdefault(row["id"], []).append(row["path"])
            n += 1
            if row["error"]:
                bad.append(row)
    return n, bad, {k: v for k, v in seen.items() if len(v) > 1}
