"""The feature cache: a Zarr v3 group of activations, one row per distinct image content.

Layout of CACHE/:
  zarr.json attrs   fingerprint of the features, `rows` (the commit point), `bad` {sha256: reason}, datasets
  hash   (R, 32) uint8     sha256 of each row's image bytes
  status (R,) int8         1 features computed, 2 undecodable image (reason in attrs `bad`)
  features/<layer> (R, D)  pool5 and conv5_3 flattened (C, H, W), float16 by default
  datasets/<name>/         one per extracted folder or manifest: path, split, label, row per file
  .lock                    held by the one process that writes

Rows are only ever appended, by one locked writer: it writes a batch's rows, then moves the commit point
(`rows`) in one atomic metadata write. Readers ignore everything past the commit point, so a killed writer
leaves a cache that reads as complete up to its last commit, and the next writer overwrites the rest.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from headstart.export.fingerprint import IncompatibleError, compatible

FORMAT = 2
OK, BAD = 1, 2
CHUNK_ROWS = 256
DTYPES = ("float16", "float32")  # storage types of the features


class CacheError(ValueError):
    """A cache that does not fit the request: another model, busy, missing, or not a cache."""


def _attrs(group: zarr.Group) -> dict:
    return dict(group.attrs)


class FeatureCache:
    """Read-only view of one dataset of a cache; arrays are aligned and hold usable images only.

    `paths`, `splits` (N,) str, `labels` (N,) int (-1 unlabelled), `hashes` (N,) hex str,
    `features(layer)` (N, D); `skipped` lists the files that could not be used, with their reason.
    """

    def __init__(self, path: str | Path, dataset: str | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise CacheError(f"{self.path}: not a feature cache; create it with `headstart extract DATA --cache "
                             f"{self.path}`")
        self.root = zarr.open_group(str(self.path), mode="r")
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
        group = self.root[f"datasets/{dataset}"]
        info = _attrs(group)
        self.classes: list[str] = list(info["classes"])
        split_names = np.array(info["splits"], dtype=object)
        rows = group["row"][:]
        status = np.zeros(len(rows), np.int8)
        known = rows >= 0
        status[known] = self.root["status"].get_orthogonal_selection(rows[known])
        keep = status == OK
        self._rows = rows[keep]
        self.paths = np.array(group["path"][:].tolist(), dtype=str)[keep]
        self.splits = split_names[group["split"][:][keep]].astype(str)
        self.labels = group["label"][:][keep].astype(np.int64)
        self.skipped: list[dict[str, str]] = list(info["skipped"])

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def hashes(self) -> np.ndarray:
        return np.array([bytes(h).hex() for h in self.root["hash"].get_orthogonal_selection(
            (self._rows, slice(None)))], dtype=str)

    def select(self, split: str | None = None) -> np.ndarray:
        """Indices of the entries of one split (all when None)."""
        return np.arange(len(self)) if split is None else np.flatnonzero(self.splits == split)

    def features(self, layer: str, index: np.ndarray | None = None, dtype: type = np.float32) -> np.ndarray:
        """(n, D) features of `layer` for the entries `index` (all when None), in that order."""
        if layer not in self.layers:
            raise CacheError(f"{self.path}: no layer {layer!r}; it holds {', '.join(self.layers)}")
        rows = self._rows if index is None else self._rows[index]
        arr = self.root[f"features/{layer}"]
        if len(rows) == 0:
            return np.zeros((0, arr.shape[1]), dtype)
        # Reading in row order touches each chunk once; then put the rows back in the caller's order.
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), arr.shape[1]), dtype)
        out[order] = arr.get_orthogonal_selection((rows[order], slice(None)))
        return out

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
            "skipped": [f"{s['path']}: {s['reason']}" for s in self.skipped],
        }


def describe(path: str | Path) -> dict:
    """What `headstart info CACHE` prints, for its first complete dataset (FeatureCache's error where none is)."""
    root = zarr.open_group(str(path), mode="r")
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
        self.path = Path(path)
        # Rows per feature chunk, fixed when the cache is created: batch-sized chunks are written whole.
        self.chunk_rows = max(16, min(chunk_rows, 4096))
        self.replace = replace
        self.dims = dims
        self.dtype = dtype
        settings = {"fingerprint": fingerprint, "dtype": dtype,
                    "model": {k: model.get(k) for k in ("weights_source", "weights_sha256", "trained")}}
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise CacheError(f"{self.path} is being written by {holder}; wait for it to finish, "
                             "or extract into another cache") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self._lock.flush()
        try:
            self._open(settings)
        except BaseException:
            self.close()
            raise

    def _open(self, settings: dict) -> None:
        ours = {".lock", "zarr.json", "hash", "status", "features", "datasets"}
        if not (self.path / "zarr.json").is_file() and any(p.name != ".lock" for p in self.path.iterdir()):
            raise CacheError(f"{self.path}: exists, is not empty and is not a feature cache")
        self.root = zarr.open_group(str(self.path), mode="a")
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
                # The marker goes first: interrupted here, the folder reads as a creation to finish.
                (self.path / "zarr.json").unlink()
                for p in self.path.iterdir():
                    if p.is_dir():
                        shutil.rmtree(p)
                return self._open(settings)
        elif attrs or any(p.name not in ours for p in self.path.iterdir()):
            raise CacheError(f"{self.path}: a Zarr store that is not a headstart feature cache")
        else:
            # New, or a creation that was killed before its marker was written: (re)make the arrays, then
            # write the marker last, so that a cache with the marker always has all of its arrays.
            rows = CHUNK_ROWS * 16
            self.root.create_array("hash", shape=(0, 32), chunks=(rows, 32), dtype="uint8", overwrite=True)
            self.root.create_array("status", shape=(0,), chunks=(rows,), dtype="int8", overwrite=True)
            for layer, d in self.dims.items():
                self.root.create_array(f"features/{layer}", shape=(0, d), chunks=(self.chunk_rows, d),
                                       dtype=self.dtype, overwrite=True)
            self.root.attrs.update({"headstart_cache": FORMAT, **settings, "rows": 0, "bad": {},
                                    "datasets": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        attrs = _attrs(self.root)
        self.rows = int(attrs["rows"])
        self.bad: dict[str, str] = dict(attrs["bad"])
        hashes = self.root["hash"][: self.rows]
        self.index = {bytes(h).hex(): i for i, h in enumerate(hashes)}

    def append(self, hashes: list[str], features: dict[str, np.ndarray] | None, bad: dict[str, str]) -> None:
        """Write rows for `hashes` (features for those not in `bad`, in order), then commit them."""
        n = len(hashes)
        if n == 0:
            return
        start, stop = self.rows, self.rows + n
        capacity = self.root["status"].shape[0]
        if stop > capacity:
            grow = max(stop, capacity * 2, CHUNK_ROWS)
            for name in ["hash", "status", *(f"features/{x}" for x in self.dims)]:
                arr = self.root[name]
                arr.resize((grow, *arr.shape[1:]))
        ok = np.array([h not in bad for h in hashes])
        for layer, d in self.dims.items():
            block = np.zeros((n, d), self.dtype)
            if features is not None and ok.any():
                block[ok] = features[layer].reshape(int(ok.sum()), d)
            self.root[f"features/{layer}"][start:stop] = block
        self.root["hash"][start:stop] = np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes),
                                                      np.uint8).reshape(n, 32)
        self.root["status"][start:stop] = np.where(ok, OK, BAD).astype(np.int8)
        self.bad.update(bad)
        # The commit point: one atomic write of the group's metadata makes these rows visible.
        self.root.attrs.update({"rows": stop, "bad": self.bad, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for i, h in enumerate(hashes):
            self.index[h] = start + i
        self.rows = stop

    def begin_dataset(self, name: str) -> None:
        datasets = _attrs(self.root)["datasets"]
        datasets[name] = {"complete": False}
        self.root.attrs.update({"datasets": datasets})

    def write_dataset(self, name: str, paths: list[str], splits: list[str], labels: list[int],
                      classes: list[str], hashes: list[str | None], unreadable: dict[str, str], source: str) -> dict:
        """Index a dataset's files against the rows; `hashes[i]` None for a file that could not be read."""
        split_names = sorted(set(splits))
        rows = np.array([self.index[h] if h is not None else -1 for h in hashes], np.int64)
        skipped = [{"path": p, "reason": unreadable.get(p) or self.bad[h]}
                   for p, h in zip(paths, hashes, strict=True) if h is None or h in self.bad]
        group = self.root.require_group(f"datasets/{name}")
        for key, values, dtype in [("path", np.array(paths, dtype=str), str), ("row", rows, "int64"),
                                   ("split", np.array([split_names.index(s) for s in splits], np.int8), "int8"),
                                   ("label", np.array(labels, np.int32), "int32")]:
            if key in group:
                del group[key]
            group.create_array(key, shape=values.shape, chunks=(max(1, min(len(values), 65536)),), dtype=dtype)
            if len(values):
                group[key][:] = values
        group.attrs.update({"classes": classes, "splits": split_names, "skipped": skipped, "source": source})
        summary = {"complete": True, "images": len(paths), "skipped": len(skipped), "source": source,
                   "classes": len(classes), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        datasets = _attrs(self.root)["datasets"]
        datasets[name] = summary
        self.root.attrs.update({"datasets": datasets})
        return summary

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

