"""`headstart audit`: label issues, near-duplicates, leaks across splits and outliers, found in the feature cache.

Label issues: out-of-fold probabilities of one head (chosen once by AutoHead on every labelled row, then refit
on k folds), read by confident learning (headstart.heads.confident). Near-duplicates: exact k nearest neighbours
by cosine similarity of L2-normalized features, computed in row blocks whose similarity matrix fits the memory
budget; pairs at or above the threshold join groups (connected components); a group in more than one split is a
leak. Outliers: the lowest mean similarity to the k nearest neighbours. The findings are one plain dict (the
JSON of docs/audit.md); pipeline/report.py draws it as HTML.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from headstart.export.errors import DataError, UsageError
from headstart.export.progress import LOG, bar
from headstart.heads.confident import RANKINGS, find_label_issues, label_quality

from .cache import FeatureCache

VERSION = 1  # of the JSON findings; bumped when a key changes meaning or goes away
# Cosine similarity of gap features from which two images are taken for copies of one photo: chosen on
# planted copies against distinct photos of one class (docs/audit.md, "How the threshold was chosen").
THRESHOLD = 0.92
NEIGHBOURS = 10  # k of the nearest-neighbour search: near-duplicate candidates and the outlier score
HEADS = ("auto", "ridge", "logistic")
# Up to this many labelled rows `auto` runs AutoHead's choice (then k refits); above, the ridge probe, whose
# k folds cost seconds where AutoHead's candidates take minutes (docs/audit.md, "Time").
AUTO_ROWS = 5000
OUTLIER_Z = 3.5  # robust z-score (median and MAD of the outlier scores) below which an image is listed


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float32); an all-zero row stays zero."""
    X = np.asarray(X, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


BLOCK_ROWS = 1024  # query rows a block at most: larger blocks only add page faults, not speed


def block_rows(n: int, memory: int) -> int:
    """Query rows per block so that a block's (rows, n) float32 similarities, twice over, fit `memory` bytes."""
    return int(max(1, min(n, BLOCK_ROWS, memory // max(1, 8 * n))))


GROUP = 64  # columns a group in the top-k search


def _top(s: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the `k` largest values of each row of `s` (columns a multiple of GROUP), unordered.

    The k largest of a row lie in the k groups of GROUP columns with the largest maxima, so one pass of maxima
    and two small partitions replace a partition of every whole row (several times slower)."""
    rows, width = s.shape
    groups = width // GROUP
    if groups <= k:
        return np.argpartition(s, width - k, axis=1)[:, width - k:]
    best = np.argpartition(s.reshape(rows, groups, GROUP).max(2), groups - k, axis=1)[:, groups - k:]
    cols = (best[:, :, None] * GROUP + np.arange(GROUP)).reshape(rows, k * GROUP)
    pick = np.argpartition(np.take_along_axis(s, cols, 1), k * GROUP - k, axis=1)[:, k * GROUP - k:]
    return np.take_along_axis(cols, pick, 1)


def nearest(unit: np.ndarray, k: int, memory: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The exact `k` nearest neighbours of every row by cosine similarity, itself left out.

    Parameters
    ----------
    unit : numpy.ndarray
        (n, D) L2-normalized rows.
    k : int
        Neighbours per row (fewer when there are fewer other rows).
    memory : int
        Bytes the similarity blocks may take.
    progress : bool
        A progress bar over the blocks.

    Returns
    -------
    index, similarity : numpy.ndarray
        (n, k) int64 and float32, each row's neighbours by decreasing similarity.
    """
    n = len(unit)
    k = min(k, n - 1)
    index, sims = np.zeros((n, max(k, 0)), np.int64), np.zeros((n, max(k, 0)), np.float32)
    if k <= 0:
        return index, sims
    step = block_rows(n, memory)
    starts = range(0, n, step)
    width = GROUP * -(-n // GROUP)  # columns padded to whole groups
    for a in bar(starts, total=len(starts), desc="neighbours", unit="block", disable=not progress or len(starts) < 4):
        b = min(a + step, n)
        s = np.full((b - a, width), -np.inf, np.float32)
        np.matmul(unit[a:b], unit.T, out=s[:, :n])
        s[np.arange(b - a), np.arange(a, b)] = -np.inf
        top = _top(s, k)
        vals = np.take_along_axis(s, top, 1)
        order = np.argsort(-vals, axis=1, kind="stable")
        index[a:b] = np.take_along_axis(top, order, 1)
        sims[a:b] = np.take_along_axis(vals, order, 1)
    return index, sims


def groups_of(index: np.ndarray, sims: np.ndarray, threshold: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Near-duplicate groups (connected components of the pairs at or above `threshold`, largest first) and those
    pairs (m, 2), each once with i < j."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(index)
    rows, cols = np.nonzero(sims >= threshold)
    pairs = np.sort(np.stack([rows, index[rows, cols]], 1), axis=1) if len(rows) else np.zeros((0, 2), np.int64)
    pairs = np.unique(pairs, axis=0)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    found = [np.flatnonzero(comp == c) for c in np.flatnonzero(sizes > 1)]
    found.sort(key=lambda g: (-len(g), int(g[0])))
    return found, pairs


def oof_proba(X: np.ndarray, y: np.ndarray, folds: int, head: str = "auto", seed: int = 0,
              say: Callable[[str], None] = LOG.info) -> tuple[np.ndarray, str]:
    """Out-of-fold class probabilities (n, K) for class indices `y`, and the head that gave them.

    ``auto``: up to AUTO_ROWS rows, AutoHead chooses a candidate once on all rows, and that candidate is refit on
    each fold's other rows; above, ``ridge``. ``ridge``: the closed-form ridge probe (heads.ridge), its penalty
    and temperature chosen on the folds. ``logistic``: L2-penalized logistic regression on standardized rows
    (LogisticHead's default penalty), each fold started from the solution on all rows. Logistic probabilities
    are calibrated by one temperature fitted on the out-of-fold logits, as AutoHead calibrates its own.
    """
    from sklearn.model_selection import StratifiedKFold

    k = int(y.max()) + 1
    smallest = int(np.bincount(y, minlength=k).min())
    if smallest < 2:
        raise DataError(f"a class has {smallest} labelled image(s); out-of-fold probabilities need at least 2 "
                        "a class")
    splits = list(StratifiedKFold(int(min(folds, smallest)), shuffle=True, random_state=seed).split(X, y))
    params, name = {"l2": 1e-2, "standardize": True, "normalize": False}, "logistic l2=0.01 standardized"
    if head == "ridge" or (head == "auto" and len(y) > AUTO_ROWS):
        from headstart.heads.ridge import oof_ridge

        proba, chosen = oof_ridge(X, y, k, splits)
        return proba, f"ridge l2={chosen['l2']:g} T={chosen['temperature']:.3g}"
    if head == "auto":
        from headstart.heads.auto import AutoHead

        t0 = time.perf_counter()
        chooser = AutoHead(random_state=seed).fit(X, y)
        win = next(r for r in chooser.cv_results_ if r["name"] == chooser.winner_)
        say(f"audit: auto chose {chooser.winner_} in {time.perf_counter() - t0:.1f} s")
        name = f"auto: {chooser.winner_}"
        if win["kind"] != "logistic":
            return _oof_any(X, y, k, splits, win["kind"], win["params"], seed), name
        params = win["params"]
    elif head != "logistic":
        raise UsageError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    return _oof_logistic(X, y, k, splits, params), name


def _oof_logistic(X: np.ndarray, y: np.ndarray, k: int, splits: list, params: dict) -> np.ndarray:
    from scipy.special import softmax

    from headstart.heads.linear import fit_logistic, logits_of
    from headstart.heads.ridge import temperature

    if params.get("normalize"):
        Z = unit_rows(X)
    else:  # standardized on all rows: no label is read, so nothing of a held-out fold's labels leaks
        Z = (X - X.mean(0)) / np.maximum(X.std(0), 1e-6)
    Z = np.asarray(Z, np.float32)
    start, _ = fit_logistic(Z, y, k, params["l2"], tol=1e-4)
    logits = np.zeros((len(y), k))
    for tr, te in bar(splits, desc="out-of-fold", unit="fold"):
        theta, _ = fit_logistic(Z[tr], y[tr], k, params["l2"], init=start, tol=1e-4)
        logits[te] = logits_of(theta, Z[te], k)
    # Calibrated as AutoHead calibrates its refit: a penalized fit's soft probabilities would leave every
    # wrong row below its class's mean self-confidence, and confident learning would find nothing.
    return softmax(logits / temperature(logits, y)[0], axis=1)


def _oof_any(X: np.ndarray, y: np.ndarray, k: int, splits: list, kind: str, params: dict, seed: int) -> np.ndarray:
    from headstart.heads.auto import _make

    proba = np.zeros((len(y), k))
    for tr, te in bar(splits, desc="out-of-fold", unit="fold"):
        est = _make(kind, params, None, seed).fit(X[tr], y[tr])
        proba[np.ix_(te, est.classes_.astype(np.int64))] = est.predict_proba(X[te])
    return proba


def _member(fc: FeatureCache, i: int, hashes: np.ndarray) -> dict:
    label = int(fc.labels[i])
    return {"path": str(fc.paths[i]), "split": str(fc.splits[i]), "label": fc.classes[label] if label >= 0 else None,
            "hash": str(hashes[i])}


def audit(cache: str, dataset: str | None = None, layer: str = "gap", folds: int = 5, head: str = "auto",
          memory: int | None = None, threshold: float = THRESHOLD, rank_by: str = "self_confidence",
          neighbours: int = NEIGHBOURS, seed: int = 0) -> dict:
    """Audit one dataset of a feature cache: label issues, near-duplicates, leaks, outliers and a class overview.

    Parameters
    ----------
    cache : str
        The feature cache (a folder or a URL).
    dataset : str, optional
        The dataset inside it (needed where it holds several).
    layer : str
        The cached layer whose features are compared and classified.
    folds : int
        Folds of the out-of-fold probabilities.
    head : {"auto", "logistic"}
        The head whose out-of-fold probabilities confident learning reads.
    memory : int, optional
        Bytes the similarity blocks may take (default: half the memory available).
    threshold : float
        Cosine similarity from which two images are near-duplicates.
    rank_by : {"self_confidence", "normalized_margin"}
        The order of the label issues.
    neighbours : int
        Nearest neighbours per image.
    seed : int
        Seed of the folds and the heads.

    Returns
    -------
    dict
        The findings, as documented in docs/audit.md.
    """
    from .train import available_memory

    if rank_by not in RANKINGS:
        raise UsageError(f"ranking {rank_by!r}: expected one of {', '.join(RANKINGS)}")
    if not -1 <= threshold <= 1:
        raise UsageError(f"threshold {threshold}: a cosine similarity is between -1 and 1")
    if folds < 2:
        raise UsageError(f"folds {folds}: need at least 2")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    fc = FeatureCache(cache, dataset)
    if len(fc) < 2:
        raise DataError(f"{fc.path}: dataset {fc.dataset!r} has {len(fc)} usable image(s); an audit needs 2")
    X = fc.features(layer)
    unit = unit_rows(X)
    hashes = fc.hashes
    seconds["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index, sims = nearest(unit, neighbours, memory or available_memory() // 2)
    seconds["neighbours"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    found, pairs = groups_of(index, sims, threshold)
    near, leaks = [], []
    for g in found:
        members = [_member(fc, int(i), hashes) for i in g]
        inside = pairs[np.isin(pairs[:, 0], g)]
        pair_sims = np.einsum("ij,ij->i", unit[inside[:, 0]], unit[inside[:, 1]])
        entry = {"members": members, "splits": sorted({m["split"] for m in members}),
                 "min_similarity": float(pair_sims.min()), "max_similarity": float(pair_sims.max()),
                 "identical": len({m["hash"] for m in members}) == 1}
        (leaks if len(entry["splits"]) > 1 else near).append(entry)
    near_pairs = [{"a": str(fc.paths[i]), "b": str(fc.paths[j]), "similarity": float(unit[i] @ unit[j]),
                   "identical": bool(hashes[i] == hashes[j]), "leak": bool(fc.splits[i] != fc.splits[j])}
                  for i, j in pairs]

    score = sims.mean(1) if sims.shape[1] else np.ones(len(fc))
    med = float(np.median(score))
    mad = float(np.median(np.abs(score - med))) * 1.4826 or 1e-12
    z = (score - med) / mad
    order = np.argsort(score, kind="stable")
    outliers = [{"rank": r + 1, **_member(fc, int(i), hashes), "score": float(score[i]), "z": float(z[i])}
                for r, i in enumerate(i for i in order if z[i] <= -OUTLIER_Z)]
    seconds["groups"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labelled = np.flatnonzero(fc.labels >= 0)
    y = fc.labels[labelled]
    present = np.unique(y)
    issues, overview, confusion, head_name, accuracy = [], [], None, None, None
    if len(present) >= 2:
        remap = np.full(len(fc.classes), -1)
        remap[present] = np.arange(len(present))
        proba_p, head_name = oof_proba(X[labelled], remap[y], folds, head, seed)
        proba = np.zeros((len(y), len(fc.classes)))
        proba[:, present] = proba_p
        pred = proba.argmax(1)
        accuracy = float((pred == y).mean())
        found_issues = find_label_issues(remap[y], proba_p, rank_by)
        quality = label_quality(remap[y], proba_p, rank_by)
        for r, pos in enumerate(found_issues):
            i = int(labelled[pos])
            issues.append({"rank": r + 1, **_member(fc, i, hashes), "given": fc.classes[int(y[pos])],
                           "suggested": fc.classes[int(pred[pos])], "score": float(quality[pos]),
                           "given_probability": float(proba[pos, y[pos]]),
                           "suggested_probability": float(proba[pos, pred[pos]])})
        k = len(fc.classes)
        matrix = np.zeros((k, k), np.int64)
        np.add.at(matrix, (y, pred), 1)
        confusion = {"classes": list(fc.classes), "matrix": matrix.tolist()}
        for c in range(k):
            rows = y == c
            overview.append({"class": fc.classes[c], "count": int((fc.labels == c).sum()),
                             "splits": {s: int(((fc.labels == c) & (fc.splits == s)).sum())
                                        for s in sorted(set(fc.splits))},
                             "oof_accuracy": float((pred[rows] == c).mean()) if rows.any() else None,
                             "suspects": sum(1 for e in issues if e["given"] == fc.classes[c])})
    confused = sorted(({"given": fc.classes[a], "predicted": fc.classes[b], "count": int(confusion["matrix"][a][b])}
                       for a in range(len(fc.classes)) for b in range(len(fc.classes))
                       if confusion and a != b and confusion["matrix"][a][b] > 0),
                      key=lambda e: -e["count"])[:10]
    seconds["labels"] = time.perf_counter() - t0
    return {
        "version": VERSION, "cache": str(fc.path), "dataset": fc.dataset, "layer": layer,
        "classes": list(fc.classes), "images": len(fc), "labelled": int(len(labelled)),
        "splits": {s: int((fc.splits == s).sum()) for s in sorted(set(fc.splits))},
        "settings": {"folds": folds, "head": head_name or head, "threshold": threshold, "neighbours": neighbours,
                     "rank_by": rank_by, "outlier_z": OUTLIER_Z, "seed": seed},
        "oof_accuracy": accuracy,
        "leaks": leaks, "near_duplicates": near, "pairs": near_pairs,
        "label_issues": issues, "outliers": outliers,
        "class_overview": overview, "confusion": confusion, "confused_pairs": confused,
        "exact_duplicates": fc.summary.get("duplicates", {}),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def exclude_paths(findings: dict) -> dict[str, list[str]]:
    """What `write_exclude` writes, by section: every label suspect, and of each leak the members outside the
    largest split (the copies that make a held-out score look better than it is)."""
    largest = max(findings["splits"], key=lambda k: findings["splits"][k]) if findings["splits"] else None
    leaked = [m["path"] for g in findings["leaks"] for m in g["members"] if m["split"] != largest]
    return {"label_issues": [e["path"] for e in findings["label_issues"]], "leaks": leaked}


def write_exclude(findings: dict, path: str | Path) -> int:
    """Write the paths of `exclude_paths` one a line, with `#` comments, for train's `--exclude`; returns how many.

    Paths are written as the cache stores them, each once.
    """
    from headstart.export.files import atomic_write

    lines, seen = [f"# headstart audit of {findings['cache']}, dataset {findings['dataset']}: one path a line; "
                   "delete the lines of the images to keep"], set()
    for section, found in exclude_paths(findings).items():
        lines.append(f"# {section.replace('_', ' ')}")
        lines += [p for p in found if not (p in seen or seen.add(p))]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(path)) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return len(seen)


def summary_lines(findings: dict) -> list[str]:
    """The findings in a few lines of text for the terminal."""
    s = findings["settings"]
    acc = findings["oof_accuracy"]
    out = [f"{findings['dataset']}: {findings['images']} images, layer {findings['layer']}, head {s['head']}, "
           f"{s['folds']} folds" + ("" if acc is None else f", out-of-fold accuracy {acc:.4f}"),
           f"  leaks: {len(findings['leaks'])} groups across splits "
           f"({sum(len(g['members']) for g in findings['leaks'])} images)",
           f"  label suspects: {len(findings['label_issues'])}",
           f"  near-duplicate groups within a split: {len(findings['near_duplicates'])}",
           f"  outliers: {len(findings['outliers'])}"]
    for e in findings["label_issues"][:5]:
        out.append(f"  suspect {e['rank']}: {e['path']}: {e['given']}, looks {e['suggested']} "
                   f"(score {e['score']:.3f})")
    for g in findings["leaks"][:3]:
        out.append("  leak: " + " = ".join(f"{m['path']} ({m['split']})" for m in g["members"][:3]))
    return out
