"""Run the frozen body once over a dataset and keep its activations: reader -> mapper -> writer.

reader: files -> sha256 and, for content the cache lacks, decoded uint8 pixels (read_batches, bounded);
mapper: batches of pixels -> onnxruntime -> named activations;
writer: CacheWriter appends rows and commits after every batch, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headstart.export.errors import ModelError, UsageError
from headstart.export.fingerprint import features_fingerprint
from headstart.export.graph import output_shapes, read_metadata
from headstart.export.progress import LOG, bar
from headstart.export.runtime import open_session

from .augment import view_key, view_spec
from .cache import CacheWriter
from .dataset import scan
from .decode import MAX_BYTES, hash_files
from .reader import read_batches, run_usable
from .storage import is_url

CHANGED = "changed while being extracted; rerun the extract to pick up its new content"


@dataclass
class Report:
    dataset: str
    files: int
    reused: int
    computed: int
    skipped: int
    seconds: float
    duplicates: dict
    flush_seconds: float = 0.0  # of `seconds`, spent making commits durable (fsync)

    def line(self) -> str:
        rate = f" ({self.computed / self.seconds:.1f} images/s)" if self.computed else ""
        return (f"{self.dataset}: {self.files} files, {self.reused} reused, {self.computed} computed{rate}, "
                f"{self.skipped} skipped")


def extract(data: str | Path, model: str | Path, cache: str | Path, *, name: str | None = None,
            batch_size: int = 32, jobs: int = 2, resize: str = "squash", dtype: str = "float16",
            device: str = "auto", replace: bool = False, overwrite_dataset: bool = False,
            max_bytes: int = MAX_BYTES, augment: int = 0, client=None, progress: bool = True) -> Report:
    """Extract the activations of every image of `data` into `cache`; only new content is computed.

    `replace`: a cache holding another model's features is emptied and rebuilt rather than refused.
    `overwrite_dataset`: a dataset of the same name extracted from another source is replaced, not refused.
    `augment`: K augmented views of each image besides its plain one (pipeline.augment), each its own row.
    `client`: a dask.distributed Client; the body then runs on its workers (pipeline.distributed).
    """
    t0 = time.perf_counter()
    if augment < 0:
        raise UsageError(f"augment {augment}: the number of augmented views must be 0 or more")
    if batch_size < 1 or jobs < 1 or max_bytes < 1:
        raise UsageError(f"batch size ({batch_size}), jobs ({jobs}) and maximum file size ({max_bytes}) "
                         "must be at least 1")
    ds = scan(data, name)
    if progress:
        LOG.info(ds.describe())
    meta = read_metadata(model)
    if meta.get("kind") != "body":
        raise ModelError(f"{model}: not a headstart body model (kind {meta.get('kind')!r}); "
                         "use the model written by `headstart export`")
    size = int(meta["image_size"])
    layers = meta["layers"].split(",")
    dims = {x: int(np.prod(shape)) for x, shape in output_shapes(meta).items()}
    source = str(data) if is_url(data) else str(Path(data).resolve())
    writer = CacheWriter(cache, features_fingerprint(meta, resize), meta, dims, dtype, replace,
                         chunk_rows=batch_size)
    with writer:
        writer.begin_dataset(ds.name, source, overwrite_dataset)
        if client is not None:  # the workers read the files anyway: let them hash too, nearer the data
            from .distributed import hash_on

            hashed = hash_on(client, ds.paths, max_bytes, progress)
        else:  # reading from an object store waits on the network, not the CPU: more requests in flight
            hashed = list(bar(hash_files(ds.paths, max_bytes, max(jobs, 16) if is_url(data) else jobs),
                               total=len(ds), desc="hashing", unit="file", disable=not progress, leave=False))
        hashes = [h for h, _ in hashed]
        unreadable = {p: why for p, (_, why) in zip(ds.paths, hashed, strict=True) if why}
        # key -> (first path with that content, view spec or None, content hash), in scan order
        todo: dict[str, tuple[str, dict | None, str]] = {}
        views = [[view_key(h, view_spec(h, k)) for k in range(augment)] if h else [] for h in hashes]
        for path, h, keys in zip(ds.paths, hashes, views, strict=True):
            if h is None:
                continue
            for key, spec in [(h, None), *((key, view_spec(h, k)) for k, key in enumerate(keys))]:
                if key not in writer.index and key not in todo:
                    todo[key] = (path, spec, h)
        known = {k for h, keys in zip(hashes, views, strict=True) if h for k in (h, *keys) if k in writer.index}
        if todo and client is not None:
            from .distributed import compute

            changed = compute(client, writer, model, todo, size, resize, batch_size, device, progress, max_bytes)
        elif todo:
            changed = _compute(writer, model, todo, size, layers, batch_size, resize, device, progress, jobs,
                               max_bytes)
        else:
            changed = set()
        for key in changed:  # on a cluster as in one process: the file gets no row, and says why
            unreadable[todo[key][0]] = CHANGED
        lost = {todo[key][0] for key in changed}
        hashes = [None if p in lost else h for p, h in zip(ds.paths, hashes, strict=True)]
        summary = writer.write_dataset(ds.name, ds.paths, ds.splits, ds.labels, ds.classes, hashes, unreadable,
                                       source, [[k if h else None for k in keys] for h, keys in
                                                zip(hashes, views, strict=True)] if augment else None)
    return Report(ds.name, len(ds), len(known), len(todo), summary["skipped"], time.perf_counter() - t0,
                  summary["duplicates"], writer.sync_seconds)


def _compute(writer: CacheWriter, model: str | Path, todo: dict[str, tuple[str, dict | None, str]], size: int,
             layers: list[str], batch_size: int, resize: str, device: str, progress: bool, jobs: int,
             max_bytes: int) -> set[str]:
    """Compute and append the rows of `todo`; returns the keys whose file changed since it was hashed."""
    session = open_session(model, device, quiet=not progress)
    shown = bar(total=len(todo), desc="extracting", unit="img", disable=not progress, smoothing=0.1)
    changed: set[str] = set()
    # The writer runs one batch behind inference, in order, so that compressing and writing a batch
    # overlaps the next forward pass; each append still commits before the next one starts.
    with ThreadPoolExecutor(1) as write_pool:
        pending = None
        try:
            items = ((key, path, spec) for key, (path, spec, _) in todo.items())
            for batch in read_batches(items, size, resize, batch_size, jobs, max_bytes):
                # A file whose bytes no longer have the hash it was listed under gets no row: its pixels
                # belong to other content, and a row keyed by the old hash would poison later reuse.
                moved = {h for h, _, digest in batch if digest != todo[h][2]}  # None: gone or unreadable now
                changed |= moved
                batch = [(h, x) for h, x, _ in batch if h not in moved]
                feats, bad = run_usable(session, layers, batch)
                if pending is not None:
                    pending.result()
                    shown.update(batch_size)
                pending = write_pool.submit(writer.append, [h for h, _ in batch], feats, bad)
            if pending is not None:
                pending.result()
                shown.update(shown.total - shown.n)
        finally:
            shown.close()
    return changed
