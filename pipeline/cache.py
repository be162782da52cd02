"""The feature cache: a Zarr v3 group of activations, one row per distinct image content.

Layout of CACHE/:
  zarr.json attrs   fingerprint of the features, `rows` (the commit point), `bad` {sha256: reason}, datasets
  hash   (R, 32) uint8     sha256 of each row's image bytes
  status (R,) int8         1 features computed, 2 undecodable image (reason in attrs `bad`)
  features/<layer> (R, D)  pool5 and conv5_3 flattened (C, H, W), float16 by default
  datasets/<name>/         one per extracted folder or manifest: path, split, label, row per file
Beside it, outside the Zarr hierarchy (so that plain zarr tools see nothing foreign):
  CACHE.lock               held by the one process that writes (a flock, or a lease object in an object store)
  CACHE.replacing          present only while --replace empties the cache; the next writer finishes it

CACHE is a local folder or an fsspec URL (s3://bucket/features.zarr, memory://, file://): see pipeline.storage.

Rows are only ever appended, by one locked writer: it writes a batch's rows, flushes them to disk, then moves
the commit point (`rows`) in one atomic metadata write, flushed too. Readers ignore everything past the
commit point, so a killed writer (or a lost power supply) leaves a cache that reads as complete up to its last
commit, and the next writer overwrites the rest. Every chunk carries a crc32c checksum; a missing or damaged
chunk is an error when read, never zeros, and `verify()` checks every committed row. A missing or damaged
metadata file (a zarr.json) is an error naming it.

This module reads it (FeatureCache, the read-only view of one dataset; describe, for `info`) and is its one
front door: the other jobs have their own rooms, whose public names it re-exports:
  cache_layout   names, chunks, codecs; opening the group and its arrays (DamagedCacheError)
  cache_writer   CacheWriter, the one locked writer; write_features, for workers
  cache_verify   verify, like `git fsck`
  duplicates     content found in more than one split, or under more than one label
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from headstart.export.errors import CacheError

from .cache_layout import (
    BAD,
    CHUNK_ROWS,
    DTYPES,
    FORMAT,
    INDEX_ROWS,
    OK,
    VOID,
    DamagedCacheError,
    attrs,
    chunk_files,
    damaged,
    missing,
    node,
    open_root,
    optional_node,
    stored_attrs,
)
from .cache_verify import verify
from .cache_writer import FLOAT16_MAX, CacheWriter, write_features
from .duplicates import duplicates_line, find_duplicates
from .storage import open_folder

__all__ = ["BAD", "CHUNK_ROWS", "DTYPES", "FLOAT16_MAX", "FORMAT", "INDEX_ROWS", "OK", "VOID", "CacheError",
           "CacheWriter", "DamagedCacheError", "FeatureCache", "chunk_files", "describe", "duplicates_line",
           "find_duplicates", "missing", "verify", "write_features"]


class FeatureCache:
    """Read-only view of one dataset of a feature cache; its arrays are aligned and hold usable images only.

    Parameters
    ----------
    path : str or Path
        The cache written by ``headstart extract`` (or `headstart.extract`): a folder or a URL.
    dataset : str, optional
        The dataset inside the cache; needed only where it holds several.

    Attributes
    ----------
    dataset : str
        The dataset's name.
    classes : list of str
        Its class names; `labels` index them.
    layers : list of str
        The cached layers, such as gap and pool5.
    paths, splits : numpy.ndarray
        (N,) str: each entry's file and split.
    labels : numpy.ndarray
        (N,) int, an index into `classes`; -1 for an unlabelled image.
    hashes : numpy.ndarray
        (N,) str, the sha256 of each entry's image bytes.
    skipped : list of dict
        The files that could not be used, with the reason: ``{"path": ..., "reason": ...}``.
    fingerprint : dict
        What the features are: the body's weights, image size, preprocessing, dtype and resize policy.
    report : Report or None
        The extract run's counts, where this view came from `headstart.extract`.

    Examples
    --------
    >>> cache = FeatureCache("cache/features.zarr")  # doctest: +SKIP
    >>> X, y = cache.xy("gap")  # doctest: +SKIP
    """

    report = None  # set by headstart.extract

    def __init__(self, path: str | Path, dataset: str | None = None) -> None:
        self.folder = open_folder(path)
        self.path = self.folder.text
        self._present: set[str] = set()  # chunks seen: committed chunks do not go away
        if self.folder.flag(".replacing"):
            raise CacheError(f"{self.path} is being replaced (or a replace was interrupted); rerun its extract "
                             "to finish it, then read it")
        if not self.folder.is_file("zarr.json"):
            raise CacheError(f"{self.path}: not a feature cache; create it with `headstart extract DATA --cache "
                             f"{self.path}`")
        self.root = open_root(self.folder)
        self.attrs = attrs(self.root)
        if self.attrs.get("headstart_cache") != FORMAT:
            raise CacheError(f"{self.path}: not a headstart feature cache (format {FORMAT})")
        try:
            self.rows = int(self.attrs["rows"])
            self.model = dict(self.attrs["model"])
            self.fingerprint: dict = dict(self.attrs["fingerprint"])
            self.layers = list(self.fingerprint["layers"])
            complete = [n for n, d in self.attrs.get("datasets", {}).items() if d.get("complete")]
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # attributes that extract never writes
            raise damaged(self.folder, "", e) from None
        if dataset is None:
            if len(complete) != 1:
                raise CacheError(f"{self.path}: " + (
                    f"holds datasets {', '.join(sorted(complete))}; pick one with --dataset" if complete else
                    "holds no complete dataset yet; run (or rerun, to resume) `headstart extract`"))
            dataset = complete[0]
        if dataset not in complete:
            state = "is incomplete: rerun its extract to resume" if dataset in self.attrs.get("datasets", {}) \
                else "does not exist"
            raise CacheError(f"{self.path}: dataset {dataset!r} {state}; complete: {', '.join(complete) or 'none'}")
        self.dataset = dataset
        # Every array's metadata whole, or an error naming it before any command starts its work.
        for name in ["hash", *(f"features/{x}" for x in self.layers)]:
            node(self.root, self.folder, name)
        try:
            group = node(self.root, self.folder, f"datasets/{dataset}")
            info = attrs(group)
            self.classes: list[str] = list(info["classes"])
            split_names = np.array(info["splits"], dtype=object)
            rows = node(group, self.folder, "row")[:]
            known = rows >= 0
            self._check_chunks("status", INDEX_ROWS, rows[known])
            status = np.zeros(len(rows), np.int8)
            status[known] = node(self.root, self.folder, "status").get_orthogonal_selection(rows[known])
            keep = status == OK
            self._rows = rows[keep]
            self.paths = np.array(node(group, self.folder, "path")[:].tolist(), dtype=str)[keep]
            self.splits = split_names[node(group, self.folder, "split")[:][keep]].astype(str)
            self.labels = node(group, self.folder, "label")[:][keep].astype(np.int64)
            # (N, K) rows of each entry's augmented views, -1 where a view is unusable; K = 0 without views
            views = optional_node(group, self.folder, "view_row")
            self.view_rows = views[:][keep] if views is not None else np.zeros((len(self._rows), 0), np.int64)
        except (KeyError, FileNotFoundError) as e:
            raise self._damaged(e) from None
        self.skipped: list[dict[str, str]] = list(info["skipped"])
        self.summary: dict = self.attrs["datasets"][dataset]

    def _check_same(self) -> None:
        """A cache replaced since it was opened reuses row numbers for other features: refuse to mix them."""
        if stored_attrs(self.folder).get("generation") != self.attrs.get("generation"):
            raise CacheError(f"{self.path} was replaced or removed since it was opened; open it again")

    def _damaged(self, e: Exception) -> CacheError:
        return CacheError(f"{self.path} changed while being read, or is damaged ({type(e).__name__}: {e}); "
                          f"rerun, and run `headstart verify --cache {self.path}` if it persists")

    def _check_chunks(self, name: str, chunk_rows: int, rows: np.ndarray) -> None:
        """Zarr reads a missing chunk as its fill value: zeros that would pass for features. Refuse instead."""
        ndim = 1 if name == "status" else 2
        files = {chunk_files(name, chunk_rows, int(i) * chunk_rows, int(i) * chunk_rows + 1, ndim)[0]: int(i)
                 for i in np.unique(rows // chunk_rows)}
        absent = missing(self.folder, [f for f in files if f not in self._present], self._present)
        if absent:
            i = files[absent[0]]
            raise CacheError(f"{self.path}: chunk {absent[0]} (rows {i * chunk_rows}-{(i + 1) * chunk_rows - 1}) "
                             f"is missing; run `headstart verify --cache {self.path}`, then extract again into a new "
                             "cache")

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def entry_rows(self) -> np.ndarray:
        """(N,) the cache row of each entry's plain view."""
        return self._rows

    def draw_views(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One cache row per entry of `index`: its plain view or one of its augmented views, drawn evenly."""
        views = self.view_rows[index]
        pick = rng.integers(0, views.shape[1] + 1, len(index))  # 0: the plain view
        drawn = views[np.arange(len(index)), np.maximum(pick - 1, 0)] if views.shape[1] else self._rows[index]
        return np.where((pick > 0) & (drawn >= 0), drawn, self._rows[index])

    @property
    def hashes(self) -> np.ndarray:
        """(N,) sha256 hex of each entry's image bytes."""
        self._check_chunks("hash", INDEX_ROWS, self._rows)
        return np.array([bytes(h).hex() for h in node(self.root, self.folder, "hash").get_orthogonal_selection(
            (self._rows, slice(None)))], dtype=str)

    def duplicate_mask(self) -> tuple[np.ndarray, np.ndarray]:
        """(cross_split, conflicting) (N,) bool: entries whose content is in more than one split / label."""
        hashes = self.hashes
        _, inverse = np.unique(hashes, return_inverse=True)
        cross, conflict = np.zeros(len(self), bool), np.zeros(len(self), bool)
        for g in np.flatnonzero(np.bincount(inverse) > 1):
            members = np.flatnonzero(inverse == g)
            cross[members] = len(set(self.splits[members])) > 1
            conflict[members] = len({y for y in self.labels[members] if y >= 0}) > 1
        return cross, conflict

    def select(self, split: str | None = None) -> np.ndarray:
        """Indices of the entries of one split (all when None)."""
        return np.arange(len(self)) if split is None else np.flatnonzero(self.splits == split)

    def features(self, layer: str, index: np.ndarray | None = None, dtype: type = np.float32) -> np.ndarray:
        """(n, D) features of `layer` for the entries `index` (all when None), in that order."""
        return self.features_at(layer, self._rows if index is None else self._rows[index], dtype)

    def features_at(self, layer: str, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """(n, D) features of `layer` in cache rows `rows` (an entry's, or one of its `view_rows`)."""
        if layer not in self.layers:
            raise CacheError(f"{self.path}: no layer {layer!r}; it holds {', '.join(self.layers)}")
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise CacheError(f"{self.path}: rows outside 0..{self.rows - 1} asked of {layer}")
        self._check_same()
        arr = node(self.root, self.folder, f"features/{layer}")
        if len(rows) == 0:
            return np.zeros((0, arr.shape[1]), dtype)
        self._check_chunks(f"features/{layer}", arr.chunks[0], rows)
        # Reading in row order touches each chunk once; then put the rows back in the caller's order.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), arr.shape[1]), dtype)
        try:
            block = arr.get_orthogonal_selection((rows[order], slice(None)))
        except Exception as e:  # a damaged chunk fails its checksum or decompression inside zarr; only zarr's read
            raise self._damaged(e) from None
        out[order] = block
        self._check_same()  # and still the same after reading: nothing of another cache slipped in
        return out

    def xy(self, layer: str, split: str | None = "train", dataset: str | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
        """Features and label names of the labelled images of one split, ready for a head's ``fit``.

        Parameters
        ----------
        layer : str
            A cached layer (see `layers`), such as gap or pool5.
        split : str or None
            The split, such as train or valid; None for every split.
        dataset : str, optional
            Another dataset of the same cache (default: this view's).

        Returns
        -------
        X : numpy.ndarray
            (n, D) float32 features, in the order of the dataset's entries.
        y : numpy.ndarray
            (n,) str, each image's class name.

        Examples
        --------
        >>> X, y = cache.xy("gap")  # doctest: +SKIP
        >>> head = hs.LogisticHead().fit(X, y)  # doctest: +SKIP
        >>> head.score(*cache.xy("gap", "valid"))  # doctest: +SKIP
        0.97
        """
        if dataset is not None and dataset != self.dataset:
            return FeatureCache(self.path, dataset).xy(layer, split)
        if layer not in self.layers:
            raise CacheError(f"{self.path}: no layer {layer!r}; it holds {', '.join(self.layers)}")
        index = np.flatnonzero((self.labels >= 0) & (True if split is None else self.splits == split))
        if len(index) == 0:
            raise CacheError(f"{self.path}: dataset {self.dataset!r} has no labelled images in "
                             + ("any split" if split is None else f"split {split!r} (splits: "
                                f"{', '.join(sorted(set(self.splits))) or 'none'})"))
        return self.features(layer, index, np.float32), np.array(self.classes, dtype=str)[self.labels[index]]

    def chunk_blocks(self, layer: str, index: np.ndarray, max_rows: int) -> list[np.ndarray]:
        """Positions into `index`, grouped so that each group reads whole chunks of `layer` and holds at most
        about `max_rows` entries (never less than one chunk's): the blocks of a streamed read."""
        rows = self._rows[index]
        chunk = node(self.root, self.folder, f"features/{layer}").chunks[0]
        order = np.argsort(rows, kind="stable")
        ids = rows[order] // chunk
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        groups, current = [], []
        for a, b in zip(starts, [*starts[1:], len(order)], strict=True):
            if current and sum(map(len, current)) + (b - a) > max_rows:
                groups.append(np.concatenate(current))
                current = []
            current.append(order[a:b])
        if current:
            groups.append(np.concatenate(current))
        return groups

    def iter_features(self, layer: str, index: np.ndarray | None = None, batch: int = 4096,
                      dtype: type = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(entry indices, features) in blocks of `batch` entries, for caches larger than memory."""
        index = np.arange(len(self)) if index is None else np.asarray(index)
        for start in range(0, len(index), batch):
            part = index[start:start + batch]
            yield part, self.features(layer, part, dtype)

    def describe(self) -> dict:
        """What `headstart info` shows of this view."""
        datasets = self.attrs.get("datasets", {})
        return {
            "cache": str(self.path), "rows": self.rows, "layers": ", ".join(self.layers),
            "model_weights": f"{self.model.get('weights_source')} sha256 {self.model.get('weights_sha256')}",
            "image_size": self.fingerprint["image_size"], "resize": self.fingerprint["resize"],
            "body_dtype": self.fingerprint["dtype"], "dtype": self.attrs.get("dtype"),
            "datasets": [f"{n}: {d.get('images', '?')} files, {d.get('skipped', 0)} skipped"
                         + ("" if d.get("complete") else " (INCOMPLETE: rerun its extract to resume)")
                         for n, d in datasets.items()],
            "dataset": self.dataset, "classes": ", ".join(self.classes),
            "splits": ", ".join(f"{s}={n}" for s, n in zip(*np.unique(self.splits, return_counts=True), strict=True)),
            "augmented_views": self.view_rows.shape[1],
            "duplicates": duplicates_line(self.summary.get("duplicates", {})) or "none",
            "skipped": [f"{s['path']}: {s['reason']}" for s in self.skipped],
        }


def describe(path: str | Path) -> dict:
    """What `headstart info CACHE` prints, for its first complete dataset (FeatureCache's error where none is)."""
    folder = open_folder(path)
    if not folder.flag(".replacing") and folder.is_file("zarr.json"):  # FeatureCache words those cases
        datasets = attrs(open_root(folder)).get("datasets", {})
        names = [n for n, d in datasets.items() if isinstance(d, dict) and d.get("complete")] \
            if isinstance(datasets, dict) else []
    else:
        names = []
    return FeatureCache(path, names[0] if names else None).describe()
