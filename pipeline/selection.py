"""One task selection: which rows of a cached dataset a head trains and is scored on, under which labels.

`Selection` is taken by `train_head`, `tune_head`, `sweep`, `evaluate` and the CLI (`selection_options` in
pipeline/options.py builds it from the shared options, its defaults read from here). A head file records it, so
`evaluate` scores the rows and labels the head was trained for.

This module imports nothing heavy at import time: the CLI reads its defaults for `--help`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.export.errors import DataError, UsageError
from headstart.export.progress import LOG

if TYPE_CHECKING:
    import numpy as np

    from .cache import FeatureCache

HASH_LENGTH = 64  # a sha256 in hex: an exclude entry of this form names content, not a path


@dataclass(frozen=True)
class Selection:
    """The rows and labels of a task.

    Parameters
    ----------
    dataset : str, optional
        The dataset inside the cache (default: its only complete one).
    train_split, valid_split : str
        The splits to train and to validate on.
    valid_fraction : float
        Held out of the train split where the dataset has no valid split, chosen by each image's content hash
        (and `seed`), so adding images never moves one between train and valid.
    seed : int
        The hold-out's seed, and the estimator's random_state.
    classes_map : dict, optional
        Cache class name -> task label, or None to leave a class out.
    drop_duplicates : bool
        Leave out images whose bytes are also in another split, or under another label.
    augmented : bool
        Each epoch, train on one of each image's cached views (from `extract --augment K`).
    exclude : tuple of str
        Rows left out of training and scoring: stored paths (as `headstart info` lists them, or their tail
        below the dataset's folder) or sha256 content hashes.
    relabel : dict
        Stored path (or its tail) -> the task label to train and score it under; the cache is not touched.
    origin : dict
        Entry of `exclude` or `relabel` -> where it was read ('file:line'), for the messages.
    """

    dataset: str | None = None
    train_split: str = "train"
    valid_split: str = "valid"
    valid_fraction: float = 0.2
    seed: int = 0
    classes_map: Mapping[str, str | None] | None = None
    drop_duplicates: bool = False
    augmented: bool = False
    exclude: tuple[str, ...] = ()
    relabel: Mapping[str, str] = field(default_factory=dict)
    origin: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.valid_fraction < 1:
            raise UsageError(f"valid fraction {self.valid_fraction}: need 0 <= fraction < 1")

    def record(self, dataset: str) -> dict:
        """What a head file keeps of it (JSON), `dataset` the one actually read."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "origin"}
        out.update(dataset=dataset, exclude=list(self.exclude), relabel=dict(self.relabel),
                   classes_map=None if self.classes_map is None else dict(self.classes_map))
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Selection:
        """The selection a head file recorded; keys it lacks (older files) keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)} - {"origin"}
        kept = {k: v for k, v in record.items() if k in names}
        if "exclude" in kept:
            kept["exclude"] = tuple(kept["exclude"])
        return cls(**kept)

    @classmethod
    def take(cls, selection: Selection | None, params: dict[str, Any]) -> Selection:
        """`selection` with the selection fields found in `params` (removed from it) applied: the keyword form
        of the one-call API, `train_head(cache, "gap", "logistic", valid_fraction=0)`."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: params.pop(k) for k in list(params) if k in names}
        if "exclude" in given:
            given["exclude"] = tuple(given["exclude"])
        return dataclasses.replace(selection or cls(), **given)


def default(name: str) -> Any:
    """A field's default, for the CLI: it keeps no second copy."""
    f = next(f for f in dataclasses.fields(Selection) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def read_classes_map(path: str | Path | None) -> dict[str, str | None] | None:
    """A YAML or JSON mapping of the cache's class names to the task's labels (null leaves a class out)."""
    if path is None:
        return None
    import yaml

    try:
        mapping = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        raise DataError(f"{path}: cannot read the classes map ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str | type(None)) for v in mapping.values()):
        raise DataError(f"{path}: a classes map is a mapping of class name -> task label (or null to leave out)")
    return {str(k): v for k, v in mapping.items()}


def read_exclude(path: str | Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """(entries, entry -> 'file:line') of an exclude file: one stored path or content hash a line; blank lines
    and `#` comments are ignored."""
    entries, origin = [], {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        entry = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()  # a '#' inside a file name is kept
        if entry and entry not in origin:
            entries.append(entry)
            origin[entry] = f"{path}:{n}"
    return tuple(entries), origin


def read_relabel(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """(stored path -> label, path -> 'file:line') of a relabel CSV: rows `path,label`, a header optional."""
    relabel, origin = {}, {}
    rows = csv.reader(io.StringIO(Path(path).read_text(encoding="utf-8")))
    for n, row in enumerate(rows, 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if n == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{n}: expected 'path,label', got {','.join(row)!r}")
        relabel[row[0].strip()] = row[1].strip()
        origin[row[0].strip()] = f"{path}:{n}"
    return relabel, origin


def task_labels(classes: list[str], labels: np.ndarray, mapping: Mapping[str, str | None] | None
                ) -> tuple[list[str], np.ndarray]:
    """Task classes and per-entry task labels (-1 for entries outside the task)."""
    import numpy as np

    if mapping is None:
        return list(classes), labels.copy()
    unknown = sorted(set(mapping) - set(classes))
    if unknown:
        raise DataError(f"classes map names {', '.join(unknown)}, which the cache does not have "
                        f"(it has {', '.join(classes)})")
    task_classes = sorted({v for v in mapping.values() if v is not None})
    lookup = np.array([task_classes.index(mapping[c]) if mapping.get(c) is not None else -1 for c in classes]
                      + [-1])  # the last slot serves label -1 (unlabelled)
    return task_classes, lookup[labels]


def _matches(fc: FeatureCache, entry: str, by_path: dict[str, list[int]], tails: Callable[[str], list[int]]
             ) -> list[int]:
    """Entries of `fc` that `entry` names: its stored path exactly, else the rows whose path ends with it."""
    return by_path.get(entry) or tails(entry)


def _path_index(fc: FeatureCache) -> tuple[dict[str, list[int]], Callable[[str], list[int]]]:
    by_path: dict[str, list[int]] = {}
    for i, p in enumerate(fc.paths.tolist()):
        by_path.setdefault(p, []).append(i)

    def tails(entry: str) -> list[int]:
        tail = "/" + entry.strip("/")
        return [i for p, rows in by_path.items() if p.endswith(tail) for i in rows]

    return by_path, tails


def task_labels_of(fc: FeatureCache, selection: Selection, say: Callable[[str], None] = lambda _: None
                   ) -> tuple[list[str], np.ndarray]:
    """The task's classes and (N,) labels of `fc`'s entries under `selection`: its classes map, then its relabels,
    then its exclusions (label -1: outside the task)."""

    classes, y = task_labels(fc.classes, fc.labels, selection.classes_map)
    if not selection.relabel and not selection.exclude:
        return classes, y
    by_path, tails = _path_index(fc)
    for path, label in selection.relabel.items():
        where = selection.origin.get(path, "relabel")
        if label not in classes:
            raise DataError(f"{where}: label {label!r} of {path} is not a class of the task "
                            f"({', '.join(classes)})")
        rows = _matches(fc, path, by_path, tails)
        if not rows:
            raise DataError(f"{where}: {path} is not a path of dataset {fc.dataset!r} in {fc.path} "
                            "(`headstart info` lists its files)")
        if len(set(fc.paths[rows].tolist())) > 1:
            raise DataError(f"{where}: {path} matches {len(rows)} files of dataset {fc.dataset!r} "
                            f"({', '.join(fc.paths[rows][:2])}, ...); write more of its path")
        y[rows] = classes.index(label)
    y[excluded(fc, selection, say, (by_path, tails))] = -1
    return classes, y


def excluded(fc: FeatureCache, selection: Selection, say: Callable[[str], None] = lambda _: None,
             index: tuple | None = None) -> np.ndarray:
    """(N,) bool: the entries of `fc` that the selection's exclusions leave out."""
    import numpy as np

    out = np.zeros(len(fc.paths), bool)
    if not selection.exclude:
        return out
    by_path, tails = index or _path_index(fc)
    hashes = fc.hashes if any(_is_hash(e) for e in selection.exclude) else np.array([], str)
    for entry in selection.exclude:
        rows = np.flatnonzero(hashes == entry.lower()) if _is_hash(entry) else _matches(fc, entry, by_path, tails)
        if len(rows) == 0:
            LOG.warning(f"{selection.origin.get(entry, 'exclude')}: {entry} matches no row of dataset "
                        f"{fc.dataset!r}; nothing left out for it")
        out[rows] = True
    if out.any():
        say(f"exclusions leave out {int(out.sum())} rows")
    return out


def _is_hash(entry: str) -> bool:
    return len(entry) == HASH_LENGTH and all(c in "0123456789abcdef" for c in entry.lower())


def held_out(hashes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: whether each image is held out, a function of its content hash (and the seed) alone.

    Adding images to a dataset never moves an existing image between train and valid.
    """
    import numpy as np

    scores = [int(hashlib.sha256(f"{seed}:{h}".encode()).hexdigest()[:13], 16) / 16**13 for h in hashes]
    return np.array(scores) < fraction


def select_rows(fc: FeatureCache, y: np.ndarray, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) entry indices. Without a valid split, a seeded fraction of train is held out by content
    hash; with `drop_duplicates`, rows whose content is also in another split or under another label are out."""
    import numpy as np

    labelled = y >= 0
    train = np.flatnonzero((fc.splits == selection.train_split) & labelled)
    valid = np.flatnonzero((fc.splits == selection.valid_split) & labelled)
    if len(train) == 0:
        raise DataError(f"{fc.path}: no labelled rows in split {selection.train_split!r} "
                        f"(splits: {', '.join(sorted(set(fc.splits)))})")
    if len(valid) == 0 and selection.valid_fraction > 0:
        held = held_out(fc.hashes[train], selection.valid_fraction, selection.seed)
        train, valid = train[~held], train[held]
    if selection.drop_duplicates:
        cross, conflict = fc.duplicate_mask()
        train, valid = train[~(cross | conflict)[train]], valid[~conflict[valid]]
    return train, valid


def task_rows(fc: FeatureCache, selection: Selection | None = None, say: Callable[[str], None] = lambda _: None
              ) -> tuple[list[str], np.ndarray, dict, np.ndarray, np.ndarray]:
    """What `train`, `tune` and `sweep` train on: (task classes, (N,) task labels (-1 outside the task), the
    selection recorded in the head file, train entries, valid entries). Notes for the user go to `say`; a task
    class without training rows is an error."""
    from .cache import duplicates_line

    selection = selection or Selection()
    classes, y = task_labels_of(fc, selection, say)
    plain = task_labels(fc.classes, fc.labels, selection.classes_map)[1]
    left_out = {c: int(((fc.labels == i) & (plain < 0)).sum()) for i, c in enumerate(fc.classes)}
    if any(left_out.values()):
        say("classes map leaves out " + ", ".join(f"{c} ({n} rows)" for c, n in left_out.items() if n))
    note = duplicates_line(fc.summary.get("duplicates", {}))
    if note:
        say(note if not selection.drop_duplicates else note.split("; `headstart")[0] + "; left out (--drop-duplicates)")
    train, valid = select_rows(fc, y, selection)
    absent = [c for i, c in enumerate(classes) if not (y[train] == i).any()]
    if absent:
        raise DataError(f"{fc.path}: class(es) {', '.join(map(repr, absent))} have no training rows in split "
                        f"{selection.train_split!r}; add images of them, or leave them out with a classes map")
    return classes, y, selection.record(fc.dataset), train, valid
