"""Tasks beyond one label an image: tags (several labels an image) and values (a number an image).

A `Target` says where a task's answers come from: a column of a CSV manifest (`labels` as `cat|outdoor`, or a
number such as `age`), or a YAML map of the cache's class names to tag sets. Its rows are the cache's own,
matched by stored path: no forward pass is added, and a head file records the Target so that `evaluate` reads
the same answers again.

This module imports nothing heavy at import time: the CLI reads it for `--help`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from headstart.export.errors import DataError, UsageError

from .storage import is_url

if TYPE_CHECKING:
    import numpy as np

    from .cache import FeatureCache

TAG_SEPARATOR = "|"
KINDS = ("tags", "value")


@dataclass(frozen=True)
class Target:
    """Where a task's tags or values are read.

    Parameters
    ----------
    kind : {"tags", "value"}
        Several labels an image, or one number an image.
    column : str, optional
        The manifest column: tags separated by '|' (kind tags), or a number (kind value).
    tags_map : dict, optional
        Cache class name -> its tags (kind tags, instead of a column): a class folder stands for a tag set.
    manifest : str, optional
        The CSV manifest holding `column` (default: the manifest the dataset was extracted from).

    Examples
    --------
    >>> age = hs.Target("value", "age")  # a number an image, from the manifest's `age` column
    >>> head = hs.train_head("cache/features.zarr", "gap", "ridge", target=age)  # doctest: +SKIP
    >>> tags = hs.Target("tags", "labels")  # tags as `cat|outdoor`, from the `labels` column
    """

    kind: str
    column: str | None = None
    tags_map: Mapping[str, tuple[str, ...]] | None = None
    manifest: str | None = None

    def __post_init__(self) -> None:
        if self.tags_map is not None:  # frozen: the normalized map replaces the given one once, here
            object.__setattr__(self, "tags_map", tag_sets(self.tags_map, "the tags map"))
        if self.kind not in KINDS:
            raise UsageError(f"task kind {self.kind!r}: choose from {', '.join(KINDS)}")
        if (self.column is None) == (self.tags_map is None) or (self.kind == "value" and self.column is None):
            raise UsageError("a tags task reads a manifest column (--tags COLUMN) or a tags map (--tags-map FILE); "
                             "a value task a numeric column (--target COLUMN)")

    def record(self) -> dict:
        """What a head file keeps of it (JSON)."""
        return {"kind": self.kind, "column": self.column, "manifest": self.manifest,
                "tags_map": None if self.tags_map is None else {k: list(v) for k, v in self.tags_map.items()}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Target:
        tags_map = record.get("tags_map")
        return cls(record["kind"], record.get("column"),
                   None if tags_map is None else {k: tuple(v) for k, v in tags_map.items()}, record.get("manifest"))

    def describe(self) -> str:
        where = f"column {self.column!r} of {self.manifest or 'the manifest'}" if self.column else "the tags map"
        return f"{'tags' if self.kind == 'tags' else 'a value'} from {where}"


def read_tags_map(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A YAML or JSON mapping of the cache's class names to tag lists (a bare string is one tag, [] none)."""
    import yaml

    try:  # BaseLoader: every name stays the text written (`yes`, `010`), not YAML 1.1's bool or number
        mapping = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot read the tags map ({e})") from None
    return tag_sets(mapping, str(path))


def tag_sets(mapping: object, where: str) -> dict[str, tuple[str, ...]]:
    """Class name -> its sorted tags, from a mapping of names to lists of names (a bare string is one tag)."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise DataError(f"{where}: a tags map is a mapping of class name -> list of tags, such as `cats: [cat, pet]`")
    out = {}
    for k, v in mapping.items():
        tags = [v] if isinstance(v, str) else list(v) if isinstance(v, list | tuple) else None
        if tags is None or not all(isinstance(t, str) and t.strip() for t in tags):
            raise DataError(f"{where}: class {k!r} maps to {v!r}; give a list of tag names (or [] for none)")
        out[str(k)] = tuple(sorted({t.strip() for t in tags}))
    return out


def target_of(tags: str | None = None, tags_map: str | Path | None = None, value: str | None = None,
              manifest: str | Path | None = None) -> Target | None:
    """The Target of train's options, or None for a task of one label an image (the classes)."""
    given = [n for n, v in (("--tags", tags), ("--tags-map", tags_map), ("--target", value)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} each define the task: give one")
    if not given:
        if manifest is not None:
            raise UsageError("--manifest names where --tags or --target columns are read; give one of them")
        return None
    if tags_map is not None:
        if manifest is not None:
            raise UsageError("--manifest names where a --tags or --target column is read; a --tags-map task reads "
                             "the class folders instead: drop one of them")
        return Target("tags", tags_map=read_tags_map(tags_map))
    # recorded absolute, so that evaluate finds it from any folder
    where = None if manifest is None else str(manifest) if is_url(str(manifest)) else str(Path(manifest).resolve())
    return Target("tags", column=tags, manifest=where) if tags is not None else Target("value", value, manifest=where)


def _manifest_of(fc: FeatureCache, target: Target) -> str:
    if target.manifest:
        return target.manifest
    source = str(fc.summary.get("source", ""))
    if not source.lower().endswith(".csv"):
        raise DataError(f"dataset {fc.dataset!r} of {fc.path} was not read from a CSV manifest ({source or 'unknown'}),"
                        f" so it has no column {target.column!r}; give --manifest FILE.csv with columns "
                        f"path,{target.column}")
    return source


def _rows_of(fc: FeatureCache, manifest: str, column: str) -> tuple[np.ndarray, list[str | None], str]:
    """For each cache entry, its value in the manifest's `column` (None where the manifest has no such row), and
    the sha256 of the manifest as read.

    A stored path matches a manifest row by its text, by the file it names (links resolved), or, where extract
    stored it relative to the folder it ran in, as the tail of the row's absolute path: from any folder.
    """
    from .dataset import COLUMNS, display, scan_csv

    if column in COLUMNS:
        raise DataError(f"{column!r} is a manifest's own column, not a task's; name a column of your own, such as "
                        "labels or age")
    ds = scan_csv(manifest)
    if column not in ds.columns:
        raise DataError(f"{manifest}: no column {column!r}; its task columns are {', '.join(ds.columns) or '(none)'}")
    by_path: dict[str, str] = {}
    for p, v in zip(map(display, ds.paths), ds.columns[column], strict=True):
        if by_path.get(p, v) != v:
            raise DataError(f"{manifest}: {p} is listed twice, with {column} {by_path[p]!r} and {v!r}; keep one row")
        by_path[p] = v
    local = [p for p in by_path if not is_url(p)]
    files = {os.path.realpath(p): by_path[p] for p in local}
    tails: dict[int, dict[str, tuple[str, str] | None]] = {}

    def tail(p: str) -> str | None:  # the row whose absolute path (as written, or resolved) ends with p
        n = len(Path(p).parts)
        if n not in tails:
            tails[n] = {}
            for row in local:
                real = os.path.realpath(row)
                for path in {os.path.abspath(row), real}:
                    key = str(Path(*Path(path).parts[-n:]))
                    seen = tails[n].get(key, (real, by_path[row]))
                    tails[n][key] = seen if seen is not None and seen[0] == real else None  # None: ambiguous
        found = tails[n].get(os.path.normpath(p))
        return None if found is None else found[1]

    stored = fc.paths.tolist()
    values = [by_path.get(p) if p in by_path or is_url(p) else
              files.get(os.path.realpath(p)) if os.path.isabs(p) else tail(p) for p in stored]
    if not any(v is not None for v in values):
        raise DataError(f"{manifest}: none of its paths is a file of dataset {fc.dataset!r} in {fc.path} "
                        f"(such as {stored[0] if stored else '-'}); write them as extract read them "
                        "(`headstart info` lists them)")
    import numpy as np

    return np.array([v is not None for v in values]), values, ds.digest


class Answers(NamedTuple):
    """A task's answers for the cache's entries: tags -> the tag names and Y (N, n_tags) of 0/1; value -> the
    column's name and Y (N,) float64. `known` (N,) is False for rows outside the task: no manifest row, an
    empty number, or a class the tags map does not name (an empty tags cell is an image with none of the tags).
    `digest`: the sha256 of the manifest they were read from (None for a tags map)."""

    names: list[str]
    Y: np.ndarray
    known: np.ndarray
    digest: str | None


def target_values(fc: FeatureCache, target: Target) -> Answers:
    """The task's `Answers` for the cache's entries, read from its manifest column or tags map."""
    import numpy as np

    if target.tags_map is not None:
        unknown = sorted(set(target.tags_map) - set(fc.classes))
        if unknown:
            raise DataError(f"the tags map names class(es) {', '.join(unknown)}, which dataset {fc.dataset!r} does "
                            f"not have (it has {', '.join(fc.classes) or 'no classes'})")
        names = sorted({t for tags in target.tags_map.values() for t in tags})
        per_class = np.zeros((len(fc.classes) + 1, len(names)), np.float32)  # the last row serves label -1
        for i, c in enumerate(fc.classes):
            for t in target.tags_map.get(c, ()):
                per_class[i, names.index(t)] = 1
        known = np.array([c in target.tags_map for c in fc.classes] + [False])[fc.labels]
        return _checked_tags(Answers(names, per_class[fc.labels], known, None), "the tags map")
    manifest = _manifest_of(fc, target)
    known, cells, digest = _rows_of(fc, manifest, target.column)
    if target.kind == "tags":
        sets = [{t.strip() for t in v.split(TAG_SEPARATOR) if t.strip()} if k else set()
                for k, v in zip(known, cells, strict=True)]
        names = sorted(set().union(*sets))
        Y = np.zeros((len(cells), len(names)), np.float32)
        for i, tags in enumerate(sets):
            Y[i, [names.index(t) for t in tags]] = 1
        return _checked_tags(Answers(names, Y, known, digest), f"column {target.column!r} of {manifest}")
    known &= np.array([v is not None and v.strip() != "" for v in cells])
    Y = np.full(len(cells), np.nan)
    for i in np.flatnonzero(known):
        try:
            Y[i] = float(cells[i])
        except ValueError:
            raise DataError(f"{manifest}: {target.column} of {fc.paths[i]} is {cells[i]!r}, not a number; "
                            "write a number, or leave the cell empty to leave the image out") from None
        if not math.isfinite(Y[i]):
            raise DataError(f"{manifest}: {target.column} of {fc.paths[i]} is {cells[i]!r}; give a finite number")
    return Answers([target.column], Y, known, digest)


def _checked_tags(answers: Answers, where: str) -> Answers:
    if not answers.names:
        raise DataError(f"{where}: no tags on any image; write them as `cat|outdoor`")
    return answers
