"""Finding the images of a dataset: folder layouts and CSV manifests -> a list of (path, split, label).

DATA is a local folder or manifest, or an fsspec URL of one (s3://bucket/photos/); a manifest's paths are
relative to it, absolute, or URLs. Paths are kept as text: local paths, or URLs for what lies in a store.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from headstart.export.errors import DataError, UsageError

from .storage import filesystem, is_url

LAYOUTS = ("DATA/<split>/<class>/*.jpg", "DATA/<class>/*.jpg", "DATA/*.jpg (unlabelled)",
           "a CSV manifest with columns path,label[,split] (and any task columns: labels, a number)")
# Common names of the usual splits, mapped to the names headstart uses (train/valid are its defaults).
SPLITS = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
          "dev": "valid", "test": "test", "testing": "test"}
COLUMNS = ("path", "label", "split")
TAGS_COLUMN = "labels"  # several labels an image, as `cat|outdoor`: the multi-label tasks' column
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def split_name(name: str) -> str:
    """The canonical name of a split: val, validation and dev are `valid`, training is `train`."""
    return SPLITS.get(name.strip().lower(), name.strip())


def check_name(name: str) -> str:
    """A dataset name that is safe as a key inside the cache: letters, digits, '.', '_' and '-'."""
    if not NAME.fullmatch(name):
        raise UsageError(f"dataset name {name!r} is not usable: use letters, digits, '.', '_' and '-' "
                         "(starting with a letter or digit), such as catsdogs")
    return name


def display(path: str | Path) -> str:
    """A path as text that can be stored and printed: bytes that are not UTF-8 become \\x escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class Dataset:
    """Images in scan order. `labels[i]` indexes `classes`, -1 when unlabelled."""

    name: str
    layout: str = ""
    paths: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    label_names: list[str | None] = field(default_factory=list)
    columns: dict[str, list[str]] = field(default_factory=dict)  # a manifest's task columns: name -> values
    digest: str | None = None  # a manifest's sha256, of the bytes read

    @property
    def classes(self) -> list[str]:
        return sorted({c for c in self.label_names if c is not None})

    @property
    def labels(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[c] if c is not None else -1 for c in self.label_names]

    def add(self, path: str | Path, split: str, label: str | None) -> None:
        self.paths.append(str(path))
        self.splits.append(split_name(split))
        self.label_names.append(label)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> str:
        """One line: the layout read, then files per split and class."""
        parts = []
        for split in sorted(set(self.splits)):
            counts = Counter(c for s, c in zip(self.splits, self.label_names, strict=True) if s == split)
            parts.append(f"{split} " + ", ".join(f"{c if c is not None else 'unlabelled'} {n}"
                                                 for c, n in sorted(counts.items(), key=lambda x: str(x[0]))))
        return f"{self.name}: {self.layout}; " + "; ".join(parts)


class _Entry:
    """A file or folder of a local tree or of a URL's, with what the scan asks of it."""

    def __init__(self, path: str | Path, is_dir: bool | None = None, fs=None) -> None:
        self.fs = fs
        self.path = path if fs is not None else Path(path)
        self.name = posixpath.basename(str(path).rstrip("/")) if fs is not None else self.path.name
        self._is_dir = is_dir

    def is_dir(self) -> bool:
        return self._is_dir if self._is_dir is not None else self.path.is_dir()

    def children(self) -> list[_Entry]:
        if self.fs is None:
            found = [_Entry(p) for p in self.path.iterdir()]
        else:
            found = [_Entry(self.fs.unstrip_protocol(d["name"]), d["type"] == "directory", self.fs)
                     for d in self.fs.ls(str(self.path), detail=True)]
        return sorted((e for e in found if not e.name.startswith(".")), key=lambda e: e.name)

    def relative_to(self, top: _Entry) -> str:
        return str(self.path)[len(str(top.path)):].lstrip("/")

    def __str__(self) -> str:
        return str(self.path)


def _files(folder: _Entry) -> list[_Entry]:
    return [p for p in folder.children() if not p.is_dir()]


def _dirs(folder: _Entry) -> list[_Entry]:
    return [p for p in folder.children() if p.is_dir()]


def _join(parent: str, path: str) -> str:
    """A manifest's path: URLs and absolute paths as they are, others relative to the manifest's folder."""
    if "://" in path or Path(path).is_absolute():
        return path
    return posixpath.join(parent, path) if is_url(parent) else str(Path(parent) / path)


def scan_csv(path: str | Path) -> Dataset:
    text = str(path)
    ds = Dataset(posixpath.splitext(posixpath.basename(text))[0], "CSV manifest")
    if is_url(text):
        fs, inner = filesystem(text)
        content, parent = fs.cat_file(inner), text.rsplit("/", 1)[0]
    else:
        content, parent = Path(text).read_bytes(), str(Path(text).parent)
    ds.digest = hashlib.sha256(content).hexdigest()
    # -sig: a byte-order mark is not part of a name
    with io.StringIO(content.decode("utf-8-sig"), newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        header = [h.lower() if h.lower() in COLUMNS else h for h in header]
        typos = [h for h in header if h not in COLUMNS and h != TAGS_COLUMN
                 and difflib.get_close_matches(h.lower(), [c for c in COLUMNS if c not in header], 1, 0.75)]
        if "path" not in header or typos or len(set(header)) != len(header) or "" in header:
            raise DataError(f"{path}: header {','.join(header) or '(none)'} is not a manifest's: its columns are "
                             "path (required), label, split and task columns (labels, numbers), each named once"
                             + (f"; {', '.join(typos)} looks like a misspelt "
                                f"{difflib.get_close_matches(typos[0].lower(), COLUMNS, 1, 0.75)[0]}" if typos
                                else ""))
        extra = [h for h in header if h not in COLUMNS]
        ds.columns = {h: [] for h in extra}
        for n, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataError(f"{path}, line {n}: {len(values)} fields, the header has {len(header)}")
            row = dict(zip(header, (v.strip() for v in values), strict=True))
            if not row["path"]:
                raise DataError(f"{path}, line {n}: empty path")
            ds.add(_join(parent, row["path"]), row.get("split") or "train", row.get("label") or None)
            for h in extra:
                ds.columns[h].append(row[h])
    return ds


def _scan_folder(source: _Entry) -> Dataset:
    ds = Dataset(source.name if source.fs is not None else source.path.resolve().name)
    subdirs = _dirs(source)
    if any(d.name.strip().lower() in SPLITS for d in subdirs):
        ds.layout = "DATA/<split>/<class>/*"
        for split in subdirs:
            for f in _files(split):
                ds.add(f.path, split.name, None)  # images right in a split folder (test1/) are unlabelled
            for cls in _dirs(split):
                _no_folders_in(cls, source)
                for f in _files(cls):
                    ds.add(f.path, split.name, cls.name)
    elif subdirs:
        ds.layout = "DATA/<class>/*, one split: train"
        for cls in subdirs:
            _no_folders_in(cls, source)
            for f in _files(cls):
                ds.add(f.path, "train", cls.name)
        stray = _files(source)
        if stray:
            raise DataError(f"{source}: files {', '.join(display(p.name) for p in stray[:3])} lie beside the class "
                             f"folders {', '.join(d.name for d in subdirs[:5])}; move them into a class folder, "
                             "or into a split folder such as test/")
    else:
        ds.layout = "DATA/* unlabelled, split test"
        for f in _files(source):
            ds.add(f.path, "test", None)
    return ds


def _no_folders_in(cls: _Entry, source: _Entry) -> None:
    inner = _dirs(cls)
    if inner:
        raise DataError(f"{source}: cannot tell the layout: {cls.relative_to(source)}/ is read as a class folder "
                         f"but holds folders ({', '.join(d.name for d in inner[:3])}); expected one of: "
                         f"{'; '.join(LAYOUTS)}, with split folders named {', '.join(sorted(set(SPLITS)))}")


def scan(source: str | Path, name: str | None = None) -> Dataset:
    """Every file of a dataset, hidden ones aside; whether each is a usable image is decided when decoding.

    Layouts: DATA/<split>/<class>/* when a top-level folder has a split's name (train, valid or val, test...;
    a split folder holding files directly is unlabelled, like test1/), DATA/<class>/* (one split, `train`),
    DATA/* with no subfolders (unlabelled, split `test`), or a CSV manifest (paths relative to it; split
    `train` where the column is absent). A folder inside a class folder is an error: the layout is ambiguous.
    """
    if is_url(source):
        fs, inner = filesystem(str(source))
        try:
            kind = fs.info(inner)["type"]
        except FileNotFoundError:
            kind = None
        top = _Entry(str(source).rstrip("/"), kind == "directory", fs)
    else:
        top = _Entry(source)
        kind = "directory" if top.path.is_dir() else "file" if top.path.is_file() else None
    if kind == "file" and str(source).lower().endswith(".csv"):
        ds = scan_csv(source)
    elif kind == "directory":
        ds = _scan_folder(top)
    else:
        raise DataError(f"{source}: no such folder or .csv manifest; expected one of: {'; '.join(LAYOUTS)}")
    if not len(ds):
        raise DataError(f"{source}: no image files found; expected one of: {'; '.join(LAYOUTS)}")
    ds.name = check_name(name) if name is not None else re.sub(r"[^A-Za-z0-9._-]", "_", ds.name).lstrip("._-") or "data"
    return ds
