"""Finding the images of a dataset: folder layouts and CSV manifests -> a list of (path, split, label)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

LAYOUTS = ("DATA/<split>/<class>/*.jpg", "DATA/<class>/*.jpg", "DATA/*.jpg (unlabelled)",
           "a CSV manifest with columns path,label[,split]")


@dataclass
class Dataset:
    """Images in scan order. `labels[i]` indexes `classes`, -1 when unlabelled."""

    name: str
    paths: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    label_names: list[str | None] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted({c for c in self.label_names if c is not None})

    @property
    def labels(self) -> list[int]:
        index = {c: i for i, c in enumerate(self.classes)}
        return [index[c] if c is not None else -1 for c in self.label_names]

    def add(self, path: Path, split: str, label: str | None) -> None:
        self.paths.append(str(path))
        self.splits.append(split)
        self.label_names.append(label)

    def __len__(self) -> int:
        return len(self.paths)


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _files(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_file()]


def _dirs(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_dir()]


def scan_csv(path: Path) -> Dataset:
    ds = Dataset(path.stem)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: a manifest needs a header row with columns path,label[,split]")
        for n, row in enumerate(reader, start=2):
            if not row.get("path"):
                raise ValueError(f"{path}, line {n}: empty path")
            image = Path(row["path"])
            ds.add(image if image.is_absolute() else path.parent / image, (row.get("split") or "train").strip(),
                   (row.get("label") or "").strip() or None)
    return ds


def scan(source: str | Path, name: str | None = None) -> Dataset:
    """Every file of a dataset, hidden ones aside; whether each is a usable image is decided when decoding.

    Layouts: DATA/<split>/<class>/* (a split folder holding files directly is unlabelled, like test1/),
    DATA/<class>/* (one split, `train`), DATA/* with no subfolders (unlabelled, split `test`), or a CSV
    manifest (paths relative to it; split `train` where the column is absent).
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        ds = scan_csv(source)
    elif source.is_dir():
        ds = Dataset(source.resolve().name)
        subdirs = _dirs(source)
        nested = [d for d in subdirs if _dirs(d)]
        if nested:
            for split in subdirs:
                for f in _files(split):
                    ds.add(f, split.name, None)
                for cls in _dirs(split):
                    for f in _files(cls):
                        ds.add(f, split.name, cls.name)
        elif subdirs:
            for cls in subdirs:
                for f in _files(cls):
                    ds.add(f, "train", cls.name)
        else:
            for f in _files(source):
                ds.add(f, "test", None)
    else:
        raise ValueError(f"{source}: no such folder or .csv manifest; expected one of: {'; '.join(LAYOUTS)}")
    if not len(ds):
        raise ValueError(f"{source}: no image files found; expected one of: {'; '.join(LAYOUTS)}")
    if name:
        ds.name = name
    return ds
