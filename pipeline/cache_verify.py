"""Checking a feature cache like `git fsck`: every committed row's chunks, statuses and dataset indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from headstart.export.errors import CacheError

from .cache_layout import (
    BAD,
    FORMAT,
    OK,
    VOID,
    DamagedCacheError,
    attrs,
    chunk_files,
    damaged,
    missing,
    node,
    open_root,
)
from .storage import Folder, open_folder


def verify(path: str | Path) -> tuple[int, list[str]]:
    """Check every committed row of a cache, like `git fsck`: (rows checked, problems found).

    Every array's metadata must be whole; every chunk under the commit point must exist, pass its checksum and
    decompress; statuses must be known; every dataset must point at committed rows only. A cache whose group
    metadata (zarr.json) is damaged cannot be checked: DamagedCacheError names it.
    """
    folder = open_folder(path)
    if folder.flag(".replacing"):
        return 0, [f"{path} is being replaced (or a replace was interrupted): rerun its extract"]
    if not folder.is_file("zarr.json"):
        raise CacheError(f"{path}: not a feature cache")
    root = open_root(folder)
    stored = attrs(root)
    if stored.get("headstart_cache") != FORMAT:
        raise CacheError(f"{path}: not a headstart feature cache (format {FORMAT})")
    try:
        rows, layers = int(stored["rows"]), list(stored["fingerprint"]["layers"])
        datasets = {n: d for n, d in stored.get("datasets", {}).items() if d.get("complete")}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise damaged(folder, "", e) from None
    problems = []
    for name in ["hash", "status", *(f"features/{x}" for x in layers)]:
        try:
            arr = node(root, folder, name)
        except DamagedCacheError as e:
            problems.append(f"{name}/zarr.json: {e.what.removeprefix('is ')}")
            continue
        problems += _check_array(folder, name, arr, rows)
    for name in datasets:
        try:
            index = node(root, folder, f"datasets/{name}/row")[:]
        except DamagedCacheError as e:
            problems.append(f"{e.node}/zarr.json: {e.what.removeprefix('is ')}")
            continue
        if (index >= rows).any():
            problems.append(f"dataset {name}: {(index >= rows).sum()} files point past the commit point")
        for part in ("path", "split", "label"):
            try:
                node(root, folder, f"datasets/{name}/{part}")
            except DamagedCacheError as e:
                problems.append(f"{e.node}/zarr.json: {e.what.removeprefix('is ')}")
    return rows, problems


def _check_array(folder: Folder, name: str, arr: zarr.Array, rows: int) -> list[str]:
    """The problems of the committed rows of one array: chunks missing, damaged, or holding unknown statuses."""
    problems = []
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
    return problems
