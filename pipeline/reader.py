"""The one reader of image files: (key, path) -> batches of (key, pixels or the reason why not, sha256), bounded.

Extract and predict both read through it, so memory stays flat however many files a folder holds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np

from .decode import MAX_BYTES, load_or_reason

K = TypeVar("K")


def read_batches(items: Iterable[tuple[K, str, dict | None]], size: int, resize: str, batch_size: int, jobs: int,
                 max_bytes: int = MAX_BYTES) -> Iterator[list[tuple[K, np.ndarray | str, str | None]]]:
    """Batches of `batch_size` (key, uint8 (size, size, 3) pixels or the reason the file is unusable, sha256 of
    the bytes read or None), in input order. Items are (key, path, augmented view spec or None).

    Each file is read once. `jobs` threads decode; at most 2 * batch_size + jobs decoded images are held at
    once, beside the batch the caller is working on.
    """
    if batch_size < 1 or jobs < 1:
        raise ValueError(f"batch size ({batch_size}) and jobs ({jobs}) must be at least 1")
    items = iter(items)

    def load(item: tuple[K, str, dict | None]) -> tuple[K, np.ndarray | str, str | None]:
        return item[0], *load_or_reason(item[1], size, resize, max_bytes, item[2])

    with ThreadPoolExecutor(jobs) as pool:
        pending = deque(pool.submit(load, x) for x in islice(items, 2 * batch_size + jobs))
        while pending:
            batch = []
            while pending and len(batch) < batch_size:
                batch.append(pending.popleft().result())
                pending.extend(pool.submit(load, x) for x in islice(items, 1))
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
            if not isinstance(x, str) and len(images) < count:
                images.append(x)
                hashes.append(digest)
    if not images:
        raise ValueError(f"{source}: no usable images to calibrate with")
    return np.stack(images), hashes
