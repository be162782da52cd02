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
chunk is an error when read, never zeros, and `verify()` checks every committed row.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from headstart.export.errors import BusyError, CacheError
from headstart.export.fingerprint import IncompatibleError, compatible

from . import augment
from .dataset import display
from .storage import Folder, open_folder

FORMAT = 2
OK, BAD, VOID = 1, 2, 3  # features computed, undecodable, nothing (its file changed while being read)
CHUNK_ROWS = 256
DTYPES = ("float16", "float32")  # storage types of the features
INDEX_ROWS = CHUNK_ROWS * 16  # rows per chunk of `hash` and `status`


FLOAT16_MAX = float(np.finfo(np.float16).max)


def _codecs() -> tuple:
    return ZstdCodec(), Crc32cCodec()


def chunk_files(name: str, chunk_rows: int, start: int, stop: int, ndim: int) -> list[str]:
    """The files of array `name` that hold rows [start, stop) (zarr v3's default chunk keys: c/<row chunk>/0),
    relative to the cache."""
    if stop <= start:
        return []
    tail = "/0" * (ndim - 1)  # one chunk across the columns of a 2-D array
    return [f"{name}/c/{i}{tail}" for i in range(start // chunk_rows, (stop - 1) // chunk_rows + 1)]


def missing(folder: Folder, files: list[str], seen: set[str] | None = None) -> list[str]:
    """Which of `files` (chunks of one array) are absent. `seen` collects the chunks found present, for the next
    call to skip: committed chunks do not go away."""
    seen = set() if seen is None else seen
    todo = [f for f in files if f not in seen]
    if todo:
        seen.update(folder.present(todo, todo[0].rsplit("/c/", 1)[0] + "/c"))
    return [f for f in files if f not in seen]


def find_duplicates(hashes: list[str | None], splits: list[str], labels: list[int], paths: list[str]) -> dict:
    """Content found more than once: in more than one split, and under more than one label (with examples)."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            groups.setdefault(h, []).append(i)
    cross, conflict = [], []
    for members in groups.values():
        if len(members) > 1:
            if len({splits[i] for i in members}) > 1:
                cross.append(members)
            if len({labels[i] for i in members if labels[i] >= 0}) > 1:
                conflict.append(members)

    def examples(found: list[list[int]]) -> list[str]:
        return [" = ".join(f"{paths[i]} ({splits[i]})" for i in m[:3]) for m in found[:3]]

    return {"cross_split": len(cross), "cross_split_files": sum(map(len, cross)),
            "conflicting_labels": len(conflict), "conflicting_files": sum(map(len, conflict)),
            "examples": examples(cross) + examples(conflict)}


def duplicates_line(d: dict) -> str:
    """One line for users, empty when there is nothing to say."""
    if not d.get("cross_split") and not d.get("conflicting_labels"):
        return ""
    return (f"duplicates: {d['cross_split']} images in more than one split ({d['cross_split_files']} files), "
            f"{d['conflicting_labels']} under conflicting labels ({d['conflicting_files']} files); e.g. "
            + "; ".join(d["examples"][:2]) + "; `headstart train --drop-duplicates` leaves them out")


def write_features(root: zarr.Group, dims: dict[str, int], dtype: str, start: int, ok: np.ndarray,
                   features: dict[str, np.ndarray] | None) -> list[str]:
    """Write rows [start, start + len(ok)) of every layer (zeros where not ok); returns the chunk files written.

    Any process may call it for rows of chunks no other process writes; the commit stays with the writer.
    """
    n, files = len(ok), []
    blocks = {}
    for layer, d in dims.items():
        block = np.zeros((n, d), dtype)
        if features is not None and ok.any():
            x = features[layer].reshape(int(ok.sum()), d)
            if dtype == "float16" and np.abs(x).max() > FLOAT16_MAX:
                raise CacheError(f"features of layer {layer} reach {np.abs(x).max():.4g}, beyond float16's "
                                 f"range ({FLOAT16_MAX:g}); extract with --dtype float32")
            block[ok] = x
        blocks[layer] = block
    for layer, block in blocks.items():
        arr = root[f"features/{layer}"]
        arr[start:start + n] = block
        files += chunk_files(f"features/{layer}", arr.chunks[0], start, start + n, 2)
    return files


def _stored_attrs(folder: Folder) -> dict:
    """The group's attributes as stored now, read afresh (not zarr's view when opened); {} when unreadable."""
    try:
        return json.loads(folder.read_text("zarr.json"))["attributes"]
    except (OSError, ValueError, KeyError):
        return {}


def _attrs(group: zarr.Group) -> dict:
    return dict(group.attrs)


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
        self.root = zarr.open_group(self.folder.zarr_path, mode="r")
        self.attrs = _attrs(self.root)
        if self.attrs.get("headstart_cache") != FORMAT:
            raise CacheError(f"{self.path}: not a headstart feature cache (format {FORMAT})")
        self.rows = int(self.attrs["rows"])
        self.model = self.attrs["model"]
        self.fingerprint: dict = self.attrs["fingerprint"]
        self.layers = list(self.fingerprint["layers"])
        complete = [n for n, d in self.attrs.get("datasets", {}).items() if d.get("complete")]
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
        try:
            group = self.root[f"datasets/{dataset}"]
            info = _attrs(group)
            self.classes: list[str] = list(info["classes"])
            split_names = np.array(info["splits"], dtype=object)
            rows = group["row"][:]
            known = rows >= 0
            self._check_chunks("status", INDEX_ROWS, rows[known])
            status = np.zeros(len(rows), np.int8)
            status[known] = self.root["status"].get_orthogonal_selection(rows[known])
            keep = status == OK
            self._rows = rows[keep]
            self.paths = np.array(group["path"][:].tolist(), dtype=str)[keep]
            self.splits = split_names[group["split"][:][keep]].astype(str)
            self.labels = group["label"][:][keep].astype(np.int64)
            # (N, K) rows of each entry's augmented views, -1 where a view is unusable; K = 0 without views
            self.view_rows = group["view_row"][:][keep] if "view_row" in group else np.zeros((len(self._rows), 0),
                                                                                               np.int64)
        except (KeyError, FileNotFoundError) as e:
            raise self._damaged(e) from None
        self.skipped: list[dict[str, str]] = list(info["skipped"])
        self.summary: dict = self.attrs["datasets"][dataset]

    def _check_same(self) -> None:
        """A cache replaced since it was opened reuses row numbers for other features: refuse to mix them."""
        if _stored_attrs(self.folder).get("generation") != self.attrs.get("generation"):
            raise CacheError(f"{self.path} was replaced or removed since it was opened; open it again")

    def _damaged(self, e: Exception) -> CacheError:
        return CacheError(f"{self.path} changed while being read, or is damaged ({type(e).__name__}: {e}); "
                          f"rerun, and run `headstart verify {self.path}` if it persists")

    def _check_chunks(self, name: str, chunk_rows: int, rows: np.ndarray) -> None:
        """Zarr reads a missing chunk as its fill value: zeros that would pass for features. Refuse instead."""
        ndim = 1 if name == "status" else 2
        files = {chunk_files(name, chunk_rows, int(i) * chunk_rows, int(i) * chunk_rows + 1, ndim)[0]: int(i)
                 for i in np.unique(rows // chunk_rows)}
        absent = missing(self.folder, [f for f in files if f not in self._present], self._present)
        if absent:
            i = files[absent[0]]
            raise CacheError(f"{self.path}: chunk {absent[0]} (rows {i * chunk_rows}-{(i + 1) * chunk_rows - 1}) "
                             f"is missing; run `headstart verify {self.path}`, then extract again into a new cache")

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
        return np.array([bytes(h).hex() for h in self.root["hash"].get_orthogonal_selection(
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
        try:
            arr = self.root[f"features/{layer}"]
            if len(rows) == 0:
                return np.zeros((0, arr.shape[1]), dtype)
            self._check_chunks(f"features/{layer}", arr.chunks[0], rows)
            # Reading in row order touches each chunk once; then put the rows back in the caller's order.
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows), arr.shape[1]), dtype)
            out[order] = arr.get_orthogonal_selection((rows[order], slice(None)))
            self._check_same()  # and still the same after reading: nothing of another cache slipped in
        except CacheError:
            raise
        except Exception as e:  # a damaged chunk fails its checksum or decompression inside zarr
            raise self._damaged(e) from None
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
        chunk = self.root[f"features/{layer}"].chunks[0]
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


def verify(path: str | Path) -> tuple[int, list[str]]:
    """Check every committed row of a cache, like `git fsck`: (rows checked, problems found).

    Every chunk under the commit point must exist, pass its checksum and decompress; statuses must be known;
    every dataset must point at committed rows only.
    """
    folder = open_folder(path)
    if folder.flag(".replacing"):
        return 0, [f"{path} is being replaced (or a replace was interrupted): rerun its extract"]
    if not folder.is_file("zarr.json"):
        raise CacheError(f"{path}: not a feature cache")
    root = zarr.open_group(folder.zarr_path, mode="r")
    attrs = _attrs(root)
    if attrs.get("headstart_cache") != FORMAT:
        raise CacheError(f"{path}: not a headstart feature cache (format {FORMAT})")
    rows, problems = int(attrs["rows"]), []
    for name in ["hash", "status", *(f"features/{x}" for x in attrs["fingerprint"]["layers"])]:
        arr = root[name]
        step = arr.chunks[0]
        absent = set(missing(folder, chunk_files(name, step, 0, rows, arr.ndim)))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            where = f"{name} rows {start}-{stop - 1}"
            if chunk_files(name, step, start, start + 1, arr.ndim)[0] in absent:
                problems.append(f"{where}: chunk missing")
                continue
            try:
                block = arr[start:stop]
            except Exception as e:  # checksum or decompression failure inside zarr
                problems.append(f"{where}: chunk damaged ({type(e).__name__}: {str(e)[:120]})")
                continue
            if name == "status" and not np.isin(block, (OK, BAD, VOID)).all():
                problems.append(f"{where}: unknown status values")
    for name, info in attrs.get("datasets", {}).items():
        if info.get("complete"):
            index = root[f"datasets/{name}/row"][:]
            if (index >= rows).any():
                problems.append(f"dataset {name}: {(index >= rows).sum()} files point past the commit point")
    return rows, problems


def describe(path: str | Path) -> dict:
    """What `headstart info CACHE` prints, for its first complete dataset (FeatureCache's error where none is)."""
    root = zarr.open_group(open_folder(path).zarr_path, mode="r")
    names = [n for n, d in _attrs(root).get("datasets", {}).items() if d.get("complete")]
    return FeatureCache(path, names[0] if names else None).describe()


class CacheWriter:
    """The single writer of a cache. Use as a context manager: it holds the cache's lock while open."""

    def __init__(self, path: str | Path, fingerprint: dict, model: dict[str, str], dims: dict[str, int],
                 dtype: str = "float16", replace: bool = False, chunk_rows: int = CHUNK_ROWS) -> None:
        """`fingerprint`: of the features (export.fingerprint); `model`: the body's metadata, for provenance;
        `dims`: features per image of each layer; `dtype`: their storage type."""
        if dtype not in DTYPES:
            raise ValueError(f"storage dtype {dtype!r}: use {' or '.join(DTYPES)}")
        self.folder = open_folder(path)
        self.path = self.folder.text
        # Rows per feature chunk, fixed when the cache is created: batch-sized chunks are written whole.
        self.chunk_rows = max(16, min(chunk_rows, 4096))
        self.replace = replace
        self.dims = dims
        self.dtype = dtype
        self.sync_seconds = 0.0  # time spent flushing to disk, which `bench extract` reports
        settings = {"fingerprint": fingerprint, "dtype": dtype,
                    "model": {k: model.get(k) for k in ("weights_source", "weights_sha256", "trained")}}
        self.folder.make()
        try:
            self._lock = self.folder.lock()
        except BusyError as e:
            raise CacheError(f"{self.path} is being written by {e}; wait for it to finish, "
                             "or extract into another cache") from None
        except OSError as e:  # in an object store: no such bucket, no right to write
            raise CacheError(f"{self.path}: cannot take the writer's lock ({e}); check that the location exists "
                             "and can be written") from None
        try:
            self._open(settings)
        except BaseException:
            self.close()
            raise

    def _empty(self) -> None:
        """Remove everything in the folder. The marker goes first and leaves last: interrupted anywhere
        between, the next writer sees it and finishes the job."""
        self.folder.set_flag(".replacing", True)
        self.folder.remove("zarr.json")
        for name in self.folder.entries():
            self.folder.remove(name)

    def _open(self, settings: dict) -> None:
        ours = {"zarr.json", "hash", "status", "features", "datasets"}
        if self.folder.flag(".replacing"):
            self._empty()  # a replace that was interrupted: finish it before anything else
        elif not self.folder.is_file("zarr.json") and self.folder.entries():
            raise CacheError(f"{self.path}: exists, is not empty and is not a feature cache")
        self.root = zarr.open_group(self.folder.zarr_path, mode="a")
        attrs = _attrs(self.root)
        if "headstart_cache" in attrs:
            if attrs["headstart_cache"] != FORMAT:
                raise CacheError(f"{self.path}: a feature cache of another format ({attrs['headstart_cache']})")
            advice = "use a new --cache for this model, or --replace to start it afresh"
            try:
                compatible(settings["fingerprint"], attrs["fingerprint"], str(self.path), advice=advice)
                if attrs["dtype"] != settings["dtype"]:
                    raise IncompatibleError(f"{self.path} stores features as {attrs['dtype']}, not {self.dtype}; "
                                            f"{advice}")
            except IncompatibleError as e:
                if not self.replace:
                    raise CacheError(str(e)) from None
                self._empty()
                return self._open(settings)
        elif attrs or any(name not in ours for name in self.folder.entries()):
            raise CacheError(f"{self.path}: a Zarr store that is not a headstart feature cache")
        else:
            # New, or a creation that was killed before its marker was written: (re)make the arrays, then
            # write the marker last, so that a cache with the marker always has all of its arrays.
            self.root.create_array("hash", shape=(0, 32), chunks=(INDEX_ROWS, 32), dtype="uint8",
                                   compressors=_codecs(), overwrite=True)
            self.root.create_array("status", shape=(0,), chunks=(INDEX_ROWS,), dtype="int8", compressors=_codecs(),
                                   overwrite=True)
            for layer, d in self.dims.items():
                self.root.create_array(f"features/{layer}", shape=(0, d), chunks=(self.chunk_rows, d),
                                       dtype=self.dtype, compressors=_codecs(), overwrite=True)
            self.root.attrs.update({"headstart_cache": FORMAT, **settings, "rows": 0, "bad": {}, "datasets": {},
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "generation": uuid.uuid4().hex})
            self._sync([])
        self.folder.set_flag(".replacing", False)
        attrs = _attrs(self.root)
        self.generation = attrs["generation"]
        self.rows = int(attrs["rows"])
        self.bad: dict[str, str] = dict(attrs["bad"])
        hashes, status = self.root["hash"][: self.rows], self.root["status"][: self.rows]
        self.index = {bytes(h).hex(): i for i, (h, st) in enumerate(zip(hashes, status, strict=True)) if st != VOID}

    def append(self, hashes: list[str], features: dict[str, np.ndarray] | None, bad: dict[str, str]) -> None:
        """Write rows for `hashes` (features for those not in `bad`, in order), then commit them."""
        if not hashes:
            return
        self.reserve(len(hashes))
        ok = np.array([h not in bad for h in hashes])
        files = write_features(self.root, self.dims, self.dtype, self.rows, ok, features)
        self.commit(self.rows, hashes, ok, bad, files)

    def reserve(self, n: int) -> None:
        """Room for `n` rows past the commit point; only this process resizes (zarr loses concurrent resizes)."""
        capacity = self.root["status"].shape[0]
        if self.rows + n > capacity:
            grow = max(self.rows + n, capacity * 2, CHUNK_ROWS)
            for name in ["hash", "status", *(f"features/{x}" for x in self.dims)]:
                arr = self.root[name]
                arr.resize((grow, *arr.shape[1:]))

    def commit(self, start: int, keys: list[str | None], ok: np.ndarray, bad: dict[str, str],
               written: list[str] = ()) -> None:
        """Write the hash and status of rows [start, start + len(keys)), whose features are written (their chunk
        files `written`, or already flushed), then move the commit point past them. A None key is a void row:
        its file changed while being read, and it holds nothing."""
        if start != self.rows:
            raise CacheError(f"{self.path}: rows from {start} cannot commit before rows from {self.rows}")
        self._check_still_ours()
        n, stop = len(keys), start + len(keys)
        self.root["hash"][start:stop] = np.frombuffer(b"".join(bytes.fromhex(k) if k else bytes(32) for k in keys),
                                                      np.uint8).reshape(n, 32)
        self.root["status"][start:stop] = np.where([k is None for k in keys], VOID, np.where(ok, OK, BAD)
                                                   ).astype(np.int8)
        # Chunks reach the disk before the commit that points at them does.
        self._sync([*written, *chunk_files("hash", INDEX_ROWS, start, stop, 2),
                    *chunk_files("status", INDEX_ROWS, start, stop, 1)])
        self.bad.update(bad)
        # The commit point: one atomic write of the group's metadata makes these rows visible.
        self.root.attrs.update({"rows": stop, "bad": self.bad, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self._sync([])
        for i, k in enumerate(keys):
            if k is not None:
                self.index[k] = start + i
        self.rows = stop

    def _check_still_ours(self) -> None:
        """Before a commit: this writer still holds the lock, and nobody else moved the commit point meanwhile."""
        try:
            self._lock.check()
        except BusyError as e:
            raise CacheError(str(e)) from None
        attrs = _stored_attrs(self.folder)
        if attrs.get("generation") != self.generation or attrs.get("rows") != self.rows:
            raise CacheError(f"{self.path} was changed by another writer while this one held it; nothing more is "
                             "committed: rerun to resume")

    def _sync(self, files: list[str]) -> None:
        """Make `files`, the arrays' metadata and the group's durable: what a commit stands on."""
        t0 = time.perf_counter()
        metadata = [f"{name}/zarr.json" for name in ["hash", "status", *(f"features/{x}" for x in self.dims)]]
        self.folder.sync([*files, *metadata, "zarr.json"])
        self.sync_seconds += time.perf_counter() - t0

    def begin_dataset(self, name: str, source: str = "", overwrite: bool = False) -> None:
        """Mark dataset `name` incomplete until `write_dataset`; refuse to reuse a name for another source."""
        datasets = _attrs(self.root)["datasets"]
        before = datasets.get(name, {}).get("source")
        if before and before != source and not overwrite:
            raise CacheError(f"{self.path}: dataset {name!r} holds {before}, not {source}; give this one "
                             "another --name, or --overwrite-dataset to replace it")
        datasets[name] = {"complete": False, "source": source}
        self.root.attrs.update({"datasets": datasets})

    def write_dataset(self, name: str, paths: list[str], splits: list[str], labels: list[int],
                      classes: list[str], hashes: list[str | None], unreadable: dict[str, str], source: str,
                      views: list[list[str | None]] | None = None) -> dict:
        """Index a dataset's files against the rows; `hashes[i]` None for a file that could not be read.

        `views[i]`: the row keys of file i's augmented views (None where it has none)."""
        split_names = sorted(set(splits))
        split_index = {s: i for i, s in enumerate(split_names)}
        rows = np.array([self.index[h] if h is not None else -1 for h in hashes], np.int64)
        shown = [display(p) for p in paths]
        skipped = [{"path": d, "reason": unreadable.get(p) or self.bad[h]}
                   for p, d, h in zip(paths, shown, hashes, strict=True) if h is None or h in self.bad]
        usable = [h if h is not None and h not in self.bad else None for h in hashes]
        group = self.root.require_group(f"datasets/{name}")
        for key, values, dtype in [("path", np.array(shown, dtype=str), str), ("row", rows, "int64"),
                                   ("split", np.array([split_index[s] for s in splits], np.int32), "int32"),
                                   ("label", np.array(labels, np.int32), "int32")]:
            if key in group:
                del group[key]
            group.create_array(key, shape=values.shape, chunks=(max(1, min(len(values), 65536)),), dtype=dtype)
            if len(values):
                group[key][:] = values
        if "view_row" in group:
            del group["view_row"]
        k = len(views[0]) if views else 0
        if k:
            view_rows = np.array([[self.index[v] if v is not None and v not in self.bad else -1 for v in keys]
                                  or [-1] * k for keys in views], np.int64)
            group.create_array("view_row", shape=view_rows.shape, chunks=(max(1, min(len(paths), 65536)), k),
                               dtype="int64")
            group["view_row"][:] = view_rows
        group.attrs.update({"classes": classes, "splits": split_names, "skipped": skipped, "source": source,
                            "augment": {"views": k, "policy": augment.POLICY} if k else None})
        summary = {"complete": True, "images": len(paths), "skipped": len(skipped), "source": source,
                   "classes": len(classes), "views": k, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "duplicates": find_duplicates(usable, splits, labels, shown)}
        datasets = _attrs(self.root)["datasets"]
        datasets[name] = summary
        self.root.attrs.update({"datasets": datasets})
        return summary

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

