"""Extraction on a Dask cluster: the same reader -> mapper -> writer, spread over workers by chunk-aligned block.

The client keeps everything that must happen in one place: it scans, decides what is new from the hashes its
workers compute, resizes the arrays, writes hash and status, and moves the commit point over finished blocks
in row order. A
worker decodes its block's files, runs the body (one onnxruntime session per worker process, kept), and writes
the block's feature rows, which fill chunks no other worker touches (zarr is safe only for that), then flushes
them. A worker killed mid-block has its block recomputed elsewhere; a killed client leaves a cache that the
same command resumes, like a single-process run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from headstart.export.errors import UsageError
from headstart.export.progress import LOG, bar

from .cache import CacheWriter, write_features
from .dataset import Dataset, scan
from .predict import classifier_metadata, predict_paths
from .reader import read_batches, run_usable, usable
from .storage import open_folder

_SESSIONS: dict = {}  # per worker process: model path -> session


@contextmanager
def dask_client(address: str) -> Iterator:
    """A Client for `address` (see client_for), closed afterwards, with the LocalCluster it started."""
    client = client_for(address)
    try:
        yield client
    finally:
        cluster = client.cluster if address.startswith("local:") else None
        client.close()
        if cluster is not None:
            cluster.close()


def client_for(address: str):
    """`local:N` starts a LocalCluster of N worker processes; anything else is a scheduler address."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError("running on Dask needs the dask extra: pip install 'headstart[dask]'") from None
    if address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"dask address {address!r}: expected local:N with N >= 1 workers, or tcp://HOST:PORT")
        return Client(LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0"))
    return Client(address)


def gpu_resources(client) -> dict | None:
    """{'GPU': 1} where workers declare GPUs (`dask worker --resources GPU=1`, one per process, each with its own
    CUDA_VISIBLE_DEVICES, as dask-cuda starts them): a block then runs only where a GPU is free."""
    workers = client.scheduler_info().get("workers", {}).values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


def blocks(start: int, n: int, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, start + n) cut at the chunk boundaries of the features: each block fills chunks of its own."""
    cuts = [start, *range((start // chunk_rows + 1) * chunk_rows, start + n, chunk_rows), start + n]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def hash_on(client, paths: list[str], max_bytes: int, progress: bool, block: int = 256
            ) -> list[tuple[str | None, str | None]]:
    """extract's hashing pass on the workers, `block` files a task: (sha256 or None, reason or None) per path."""
    from distributed import as_completed

    futures = {client.submit(_hash_block, paths[i:i + block], max_bytes, pure=False, retries=3): i
               for i in range(0, len(paths), block)}
    out: list = [None] * len(paths)
    with bar(total=len(paths), desc="hashing", unit="file", disable=not progress, leave=False) as shown:
        for future in as_completed(futures):
            i, found = futures[future], future.result()
            out[i:i + len(found)] = found
            shown.update(len(found))
    return out


def _hash_block(paths: list[str], max_bytes: int) -> list[tuple[str | None, str | None]]:
    from .decode import hash_files

    return list(hash_files(paths, max_bytes, 8))  # reading waits on storage more than on the CPU


def compute_block(model: str, cache: str, dims: dict[str, int], dtype: str, start: int, items: list[tuple],
                  size: int, resize: str, batch_size: int, max_bytes: int, device: str) -> dict:
    """On a worker: features of `items` (key, path, view spec, content hash) into rows start..; returns what the
    client commits: keys (None for a file that changed since it was hashed), which rows are usable, reasons."""
    session, layers = _session(model, device), list(dims)
    content = {key: c for key, _, _, c in items}
    keys, ok, bad, feats = [], [], {}, {x: [] for x in layers}
    for batch in read_batches([(k, p, v) for k, p, v, _ in items], size, resize, batch_size, 1, max_bytes):
        kept = [(key, x) for key, x, digest in batch if digest == content[key]]  # else changed since hashed
        keys += [key if digest == content[key] else None for key, _, digest in batch]
        ok += [digest == content[key] and usable(x) for key, x, digest in batch]
        outs, reasons = run_usable(session, layers, kept)
        bad.update(reasons)
        for layer, out in (outs or {}).items():
            feats[layer].append(out)
    ok = np.array(ok)
    features = {x: np.concatenate(v) for x, v in feats.items()} if ok.any() else None
    folder = open_folder(cache)
    folder.sync(write_features(zarr.open_group(folder.zarr_path, mode="r+"), dims, dtype, start, ok, features))
    return {"start": start, "keys": keys, "ok": ok, "bad": bad, "pid": os.getpid()}


def _session(model: str, device: str):
    """The worker process's session of `model`, opened once and kept."""
    from distributed import get_worker

    from headstart.export.runtime import open_session

    if model not in _SESSIONS:  # as many threads as the worker was given: workers share the machine's cores
        _SESSIONS[model] = open_session(model, device, threads=get_worker().state.nthreads, quiet=True)
    return _SESSIONS[model]


def predict_on(client, images: str | Path | Dataset, model: str | Path, batch_size: int = 32, device: str = "auto",
               clip: tuple[float, float] | None = None, block: int = 512):
    """predict's rows, in scan order, computed on the cluster's workers `block` files at a time."""
    classifier_metadata(model)  # a clear error here rather than on every worker
    paths = (images if isinstance(images, Dataset) else scan(images)).paths  # the caller may have scanned it
    model = str(Path(model).resolve())
    futures = [client.submit(_predict_block, model, paths[i:i + block], batch_size, device, clip, pure=False,
                             retries=3) for i in range(0, len(paths), block)]
    for future in futures:
        yield from future.result()


def _predict_block(model: str, paths: list[str], batch_size: int, device: str,
                   clip: tuple[float, float] | None) -> list[dict]:
    return list(predict_paths(paths, _session(model, device), classifier_metadata(model), batch_size, 1, clip))


def compute(client, writer: CacheWriter, model: str | Path, todo: dict[str, tuple[str, dict | None, str]],
            size: int, resize: str, batch_size: int, device: str, progress: bool, max_bytes: int) -> set[str]:
    """extract's _compute on a cluster: returns the keys whose file changed since it was hashed."""
    keys = list(todo)
    start = writer.rows
    writer.reserve(len(keys))
    chunk_rows = writer.root[f"features/{next(iter(writer.dims))}"].chunks[0]
    args = (str(Path(model).resolve()), writer.folder.absolute(), writer.dims, writer.dtype)
    resources = gpu_resources(client)
    futures = [client.submit(compute_block, *args, a,
                             [(k, *todo[k]) for k in keys[a - start:b - start]], size, resize, batch_size,
                             max_bytes, device, pure=False, retries=3, resources=resources)
               for a, b in blocks(start, len(keys), chunk_rows)]
    from distributed import as_completed

    if progress and client.dashboard_link:
        LOG.info(f"dask dashboard: {client.dashboard_link}")
    done, changed = {}, set()
    with bar(total=len(keys), desc="extracting", unit="img", disable=not progress) as shown:
        for future in as_completed(futures):
            result = future.result()
            done[result["start"]] = result
            shown.update(len(result["keys"]))
            # Commits go in row order: readers see a prefix of finished blocks, never a hole.
            while writer.rows in done:
                r = done.pop(writer.rows)
                changed |= {k for k, kept in zip(keys[r["start"] - start:], r["keys"], strict=False) if kept is None}
                writer.commit(r["start"], r["keys"], r["ok"], r["bad"])
    return changed
