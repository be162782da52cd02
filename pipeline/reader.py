"""The one reader of image files: (key, path) -> batches of (key, pixels or Unreadable, sha256), bounded; and
the one step that runs a body or classifier on a batch's usable images.

Extract (in one process and on Dask workers) and predict all read through it, so memory stays flat however
many files a folder holds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np

from headstart.export.errors import DataError, UsageError

from .decode import MAX_BYTES, Unreadable, load

K = TypeVar("K")
Pixels = np.ndarray | Unreadable  # uint8 (size, size, 3), or why the file gave none


def usable(x: Pixels) -> bool:
    """Whether a read gave pixels."""
    return not isinstance(x, Unreadable)


def run_usable(session, outputs: list[str], batch: list[tuple[K, Pixels]]
               ) -> tuple[dict[str, np.ndarray] | None, dict[K, str]]:
    """Run `session` once on the usable images of `batch`, in order: (its `outputs` by name, a row per usable
    image, or None when there is none; key -> reason for each unreadable one)."""
    good = [x for _, x in batch if usable(x)]
    bad = {k: x.reason for k, x in batch if not usable(x)}
    if not good:
        return None, bad
    return dict(zip(outputs, session.run(outputs, {"images": np.stack(good)}), strict=True)), bad


def read_batches(items: Iterable[tuple[K, str, dict | None]], size: int, resize: str, batch_size: int, jobs: int,
                 max_bytes: int = MAX_BYTES) -> Iterator[list[tuple[K, Pixels, str | None]]]:
    """Batches of `batch_size` (key, uint8 (size, size, 3) pixels or Unreadable(why), sha256 of the bytes read
    or None), in input order. Items are (key, path, augmented view spec or None).

    Each file is read once. `jobs` threads decode; at most 2 * batch_size + jobs decoded images are held at
    once, beside the batch the caller is working on.
    """
    if batch_size < 1 or jobs < 1:
        raise UsageError(f"batch size ({batch_size}) and jobs ({jobs}) must be at least 1")
    items = iter(items)

    def read(item: tuple[K, str, dict | None]) -> tuple[K, Pixels, str | None]:
        return item[0], *load(item[1], size, resize, max_bytes, item[2])

    with ThreadPoolExecutor(jobs) as pool:
        pending = deque(pool.submit(read, x) for x in islice(items, 2 * batch_size + jobs))
        while pending:
            batch = []
            while pending and len(batch) < batch_size:
                batch.append(pending.popleft().result())
                pending.extend(pool.submit(read, x) for x in islice(items, 1))
            yield batch


def sample_images(source: str | Path, count: int, size: int, resize: str = "squash"
                  ) -> tuple[np.ndarray, list[str]]:
    """Up to `count` usable images spread evenly over a dataset: (uint8 (n, size, size, 3), their sha256)."""
    from .dataset import scan

    paths = scan(source).paths
    step = max(1, len(paths) // count)
    picked = [(p, p, None) for p in paths[::step]]
    images, hashes = [], []
    for batch in read_batches(picked, size, resize, batch_size=16, jobs=2):
        for _, x, digest in batch:
            if usable(x) and len(images) < count:
                images.append(x)
                hashes.append(digest)
    if not images:
        raise DataError(f"{source}: no usable images to calibrate with")
    return np.stack(images), hashes
