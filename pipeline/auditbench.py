"""Generated feature caches for the audit's benchmark and tests: gap-like rows with known faults.

Rows are non-negative (like a ReLU's average) around one centre per class; a share of the labels is flipped and
some rows are near-copies of others in the other split. Nothing is decoded: the paths name no real file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from headstart.export.fingerprint import features_fingerprint

from .cache import CacheWriter


def generated_features(rows: int, dim: int = 512, classes: int = 10, flip: float = 0.05, copies: int = 20,
                       seed: int = 0) -> dict:
    """Features, labels, splits and the planted faults (flipped rows, (original, copy) pairs).

    Returns
    -------
    dict
        X (rows, dim) float32; labels (rows,) given class indices; true (rows,) the right ones; splits (rows,)
        str; flipped (m,) row indices; copies (c, 2) rows (original in train, copy in valid).
    """
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, (classes, dim)).astype(np.float32)
    true = rng.integers(0, classes, rows)
    X = np.maximum(centres[true] + rng.normal(0, 1.6, (rows, dim)).astype(np.float32), 0)
    splits = np.where(rng.random(rows) < 0.8, "train", "valid").astype(object)
    train = np.flatnonzero(splits == "train")
    originals = rng.choice(train, copies, replace=False)
    targets = rng.choice(np.setdiff1d(np.arange(rows), originals), copies, replace=False)
    X[targets] = np.maximum(X[originals] * rng.uniform(0.9, 1.1, (copies, 1)) + rng.normal(0, 0.15, (copies, dim)),
                            0)
    true[targets], splits[targets] = true[originals], "valid"
    labels = true.copy()
    candidates = np.setdiff1d(np.arange(rows), np.r_[originals, targets])
    flipped = np.sort(rng.choice(candidates, int(round(flip * rows)), replace=False))
    labels[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return {"X": X, "labels": labels, "true": true, "splits": splits.astype(str), "flipped": flipped,
            "copies": np.stack([originals, targets], 1)}


def write_cache(path: str | Path, X: np.ndarray, labels: np.ndarray, splits: np.ndarray, classes: list[str],
                paths: list[str] | None = None, layer: str = "gap", dataset: str = "generated") -> list[str]:
    """A feature cache of one layer holding rows `X` as dataset `dataset`; returns the paths recorded."""
    n = len(X)
    meta = {"weights_sha256": "generated", "image_size": "224", "preprocessing": "generated", "dtype": "float32",
            "layers": layer, "weights_source": "generated"}
    paths = paths or [f"/generated/{splits[i]}/{classes[labels[i]]}/{i}.jpg" for i in range(n)]
    hashes = [f"{i:064x}" for i in range(n)]
    with CacheWriter(path, features_fingerprint(meta, "squash"), meta, {layer: X.shape[1]}, "float32",
                     chunk_rows=4096) as w:
        w.begin_dataset(dataset, "generated")
        for a in range(0, n, 4096):
            w.append(hashes[a:a + 4096], {layer: X[a:a + 4096]}, {})
        w.write_dataset(dataset, list(paths), [str(s) for s in splits], [int(v) for v in labels], list(classes),
                        hashes, {}, "generated")
    return list(paths)


def bench_audit(rows: int = 25_000, dim: int = 512, head: str = "logistic", folds: int = 5,
                cache: str | Path | None = None, seed: int = 0) -> list[dict]:
    """Time `audit` on a generated cache of `rows` gap rows, and how many planted faults it finds."""
    import tempfile

    from .audit import audit

    g = generated_features(rows, dim, seed=seed)
    classes = [f"c{i}" for i in range(int(g["true"].max()) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        where = cache or Path(tmp) / "generated.zarr"
        paths = np.array(write_cache(where, g["X"], g["labels"], g["splits"], classes))
        t0, c0 = time.perf_counter(), time.process_time()
        found = audit(str(where), layer="gap", folds=folds, head=head)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    flipped = set(paths[g["flipped"]])
    top = [e["path"] for e in found["label_issues"][:2 * len(flipped)]]
    copies = {frozenset(p) for p in paths[g["copies"]].tolist()}
    group = {m["path"]: i for i, grp in enumerate(found["leaks"]) for m in grp["members"]}
    leaked = {c for c in copies if len({group.get(p, -1 - k) for k, p in enumerate(c)}) == 1}
    pairs = {frozenset((p["a"], p["b"])) for p in found["pairs"]}
    return [{"rows": rows, "dim": dim, "head": found["settings"]["head"], "folds": folds,
             "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
             **{f"s_{k}": v for k, v in found["seconds"].items()},
             "flipped": len(flipped), "flipped_in_top_2x": round(len(flipped & set(top)) / max(1, len(flipped)), 3),
             "copies_found": round(len(copies & leaked) / max(1, len(copies)), 3),
             "pairs": len(pairs), "false_pairs": len(pairs - copies)}]
