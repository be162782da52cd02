"""Writing a feature cache: `CacheWriter`, its one locked writer, and `write_features`, which any process may
call for rows of chunks no other process writes (see pipeline.cache for the commit protocol)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import zarr

from headstart.export.errors import BusyError, CacheError, IncompatibleError, UsageError
from headstart.export.fingerprint import compatible

from . import augment
from .cache_layout import (
    BAD,
    CHUNK_ROWS,
    DTYPES,
    FORMAT,
    INDEX_ROWS,
    OK,
    OURS,
    VOID,
    DamagedCacheError,
    attrs,
    chunk_files,
    codecs,
    damaged,
    node,
    open_root,
    stored_attrs,
)
from .dataset import display
from .duplicates import find_duplicates
from .storage import open_folder

FLOAT16_MAX = float(np.finfo(np.float16).max)


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
                                 f"range ({FLOAT16_MAX:g}); store the features as float32 (--storage-dtype float32)")
            block[ok] = x
        blocks[layer] = block
    for layer, block in blocks.items():
        arr = root[f"features/{layer}"]
        arr[start:start + n] = block
        files += chunk_files(f"features/{layer}", arr.chunks[0], start, start + n, 2)
    return files


class CacheWriter:
    """The single writer of a cache. Use as a context manager: it holds the cache's lock while open."""

    def __init__(self, path: str | Path, fingerprint: dict, model: dict[str, str], dims: dict[str, int],
                 dtype: str = "float16", replace: bool = False, chunk_rows: int = CHUNK_ROWS) -> None:
        """`fingerprint`: of the features (export.fingerprint); `model`: the body's metadata, for provenance;
        `dims`: features per image of each layer; `dtype`: their storage type."""
        if dtype not in DTYPES:
            raise UsageError(f"storage dtype {dtype!r}: use {' or '.join(DTYPES)}")
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
        """Take the cache over: create it, resume it, or (with `replace`) empty it first where it holds other
        features or is damaged."""
        try:
            self._take_over(settings)
        except DamagedCacheError as e:
            if not self.replace:
                raise
            foreign = sorted(set(self.folder.entries()) - OURS)
            if foreign:
                raise CacheError(f"{str(e).split(';')[0]}, and {self.path} holds {', '.join(foreign[:3])}, which a "
                                 "feature cache does not: not emptied; extract into a new cache") from None
            self._empty()
            self._take_over(settings)

    def _take_over(self, settings: dict) -> None:
        if self.folder.flag(".replacing"):
            self._empty()  # a replace that was interrupted: finish it before anything else
        elif not self.folder.is_file("zarr.json") and self.folder.entries():
            raise CacheError(f"{self.path}: exists, is not empty and is not a feature cache")
        if self.folder.is_file("zarr.json"):
            self.root = open_root(self.folder, "a")
        else:
            self.root = zarr.open_group(self.folder.zarr_path, mode="a")
        stored = attrs(self.root)
        if "headstart_cache" in stored:
            if stored["headstart_cache"] != FORMAT:
                raise CacheError(f"{self.path}: a feature cache of another format ({stored['headstart_cache']})")
            advice = "use a new --cache for this model, or --replace to start it afresh"
            try:
                compatible(settings["fingerprint"], stored["fingerprint"], str(self.path), advice=advice)
                if stored["dtype"] != settings["dtype"]:
                    raise IncompatibleError(f"{self.path} stores features as {stored['dtype']}, not {self.dtype}; "
                                            f"{advice}")
            except IncompatibleError as e:
                if not self.replace:
                    raise CacheError(str(e)) from None
                self._empty()
                return self._take_over(settings)
            except (KeyError, TypeError, AttributeError) as e:  # attributes that extract never writes
                raise damaged(self.folder, "", e) from None
        elif stored or any(name not in OURS for name in self.folder.entries()):
            raise CacheError(f"{self.path}: a Zarr store that is not a headstart feature cache")
        else:
            # New, or a creation that was killed before its marker was written: (re)make the arrays, then
            # write the marker last, so that a cache with the marker always has all of its arrays.
            self.root.create_array("hash", shape=(0, 32), chunks=(INDEX_ROWS, 32), dtype="uint8",
                                   compressors=codecs(), overwrite=True)
            self.root.create_array("status", shape=(0,), chunks=(INDEX_ROWS,), dtype="int8", compressors=codecs(),
                                   overwrite=True)
            for layer, d in self.dims.items():
                self.root.create_array(f"features/{layer}", shape=(0, d), chunks=(self.chunk_rows, d),
                                       dtype=self.dtype, compressors=codecs(), overwrite=True)
            self.root.attrs.update({"headstart_cache": FORMAT, **settings, "rows": 0, "bad": {}, "datasets": {},
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "generation": uuid.uuid4().hex})
            self._sync([])
        self.folder.set_flag(".replacing", False)
        stored = attrs(self.root)
        try:
            self.generation = stored["generation"]
            self.rows = int(stored["rows"])
            self.bad: dict[str, str] = dict(stored["bad"])
        except (KeyError, TypeError, ValueError) as e:
            raise damaged(self.folder, "", e) from None
        for name in self.dims:  # every array's metadata whole before anything is written
            node(self.root, self.folder, f"features/{name}")
        hashes = node(self.root, self.folder, "hash")[: self.rows]
        status = node(self.root, self.folder, "status")[: self.rows]
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
            # Only a caller's bug commits out of order: no user error, so it keeps its traceback.
            raise RuntimeError(f"{self.path}: rows from {start} cannot commit before rows from {self.rows}")
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
        stored = stored_attrs(self.folder)
        if stored.get("generation") != self.generation or stored.get("rows") != self.rows:
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
        datasets = attrs(self.root)["datasets"]
        before = datasets.get(name, {}).get("source")
        if before and before != source and not overwrite:
            raise CacheError(f"{self.path}: dataset {name!r} holds {before}, not {source}; give this one "
                             "another dataset name (--dataset), or replace it (--overwrite-dataset)")
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
        datasets = attrs(self.root)["datasets"]
        datasets[name] = summary
        self.root.attrs.update({"datasets": datasets})
        return summary

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
