"""Heads from the cache: tasks (classes maps), row selection, training and scoring on cached features.

The estimators themselves (headstart.heads) take plain arrays; this module feeds them from a FeatureCache.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from headstart.export.files import atomic_write
from headstart.export.fingerprint import compatible
from headstart.heads.kinds import KINDS
from headstart.heads.metrics import metrics, plot_confusion
from headstart.heads.models import DenseHead, EpochLog, MLPHead, SoftmaxHead

from .cache import FeatureCache, duplicates_line
from .decode import BadImage, read_bytes


def read_classes_map(path: str | Path | None) -> dict[str, str | None] | None:
    """A YAML or JSON mapping of the cache's class names to the task's labels (null leaves a class out)."""
    if path is None:
        return None
    import yaml

    try:
        mapping = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the classes map ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str | type(None)) for v in mapping.values()):
        raise ValueError(f"{path}: a classes map is a mapping of class name -> task label (or null to leave out)")
    return {str(k): v for k, v in mapping.items()}


def task_labels(classes: list[str], labels: np.ndarray, mapping: dict[str, str | None] | None
                ) -> tuple[list[str], np.ndarray]:
    """Task classes and per-entry task labels (-1 for entries outside the task)."""
    if mapping is None:
        return list(classes), labels.copy()
    unknown = sorted(set(mapping) - set(classes))
    if unknown:
        raise ValueError(f"classes map names {', '.join(unknown)}, which the cache does not have "
                         f"(it has {', '.join(classes)})")
    task_classes = sorted({v for v in mapping.values() if v is not None})
    lookup = np.array([task_classes.index(mapping[c]) if mapping.get(c) is not None else -1 for c in classes]
                      + [-1])  # the last slot serves label -1 (unlabelled)
    return task_classes, lookup[labels]


def held_out(hashes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: whether each image is held out, a function of its content hash (and the seed) alone.

    Adding images to a dataset never moves an existing image between train and valid.
    """
    scores = [int(hashlib.sha256(f"{seed}:{h}".encode()).hexdigest()[:13], 16) / 16**13 for h in hashes]
    return np.array(scores) < fraction


def select_rows(fc: FeatureCache, y: np.ndarray, selection: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) entry indices. Without a valid split, a seeded fraction of train is held out by content
    hash; with `drop_duplicates`, rows whose content is also in another split or under another label are out."""
    labelled = y >= 0
    train = np.flatnonzero((fc.splits == selection["train_split"]) & labelled)
    valid = np.flatnonzero((fc.splits == selection["valid_split"]) & labelled)
    if len(train) == 0:
        raise ValueError(f"{fc.path}: no labelled rows in split {selection['train_split']!r} "
                         f"(splits: {', '.join(sorted(set(fc.splits)))})")
    if len(valid) == 0 and selection["valid_fraction"] > 0:
        held = held_out(fc.hashes[train], selection["valid_fraction"], selection["seed"])
        train, valid = train[~held], train[held]
    if selection.get("drop_duplicates"):
        cross, conflict = fc.duplicate_mask()
        train, valid = train[~(cross | conflict)[train]], valid[~conflict[valid]]
    return train, valid


def task_rows(fc: FeatureCache, *, classes_map: dict[str, str | None] | None = None, train_split: str = "train",
              valid_split: str = "valid", valid_fraction: float = 0.2, seed: int = 0, drop_duplicates: bool = False,
              say: Callable[[str], None] = lambda _: None
              ) -> tuple[list[str], np.ndarray, dict, np.ndarray, np.ndarray]:
    """What `train` and `tune` both train on: (task classes, (N,) task labels (-1 outside the task), the
    selection recorded in the head file, train entries, valid entries). Notes for the user go to `say`; a task
    class without training rows is an error."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"--valid-fraction {valid_fraction}: need 0 <= fraction < 1")
    classes, y = task_labels(fc.classes, fc.labels, classes_map)
    left_out = {c: int(((fc.labels == i) & (y < 0)).sum()) for i, c in enumerate(fc.classes)}
    if any(left_out.values()):
        say("classes map leaves out " + ", ".join(f"{c} ({n} rows)" for c, n in left_out.items() if n))
    selection = {"dataset": fc.dataset, "train_split": train_split, "valid_split": valid_split,
                 "valid_fraction": valid_fraction, "seed": seed, "classes_map": classes_map,
                 "drop_duplicates": drop_duplicates}
    note = duplicates_line(fc.summary.get("duplicates", {}))
    if note:
        say(note if not drop_duplicates else note.split("; `headstart")[0] + "; left out (--drop-duplicates)")
    train, valid = select_rows(fc, y, selection)
    absent = [c for i, c in enumerate(classes) if not (y[train] == i).any()]
    if absent:
        raise ValueError(f"{fc.path}: class(es) {', '.join(map(repr, absent))} have no training rows in split "
                         f"{train_split!r}; add images of them, or leave them out with a classes map")
    return classes, y, selection, train, valid


def train_head(cache: str | Path, layer: str = "gap", kind: str = "auto", *, dataset: str | None = None,
               task: str | None = None, classes_map: dict[str, str | None] | None = None,
               train_split: str = "train", valid_split: str = "valid", valid_fraction: float = 0.2, seed: int = 0,
               drop_duplicates: bool = False, memory: int | None = None, augmented: bool = False,
               log: EpochLog | None = None,
               say: Callable[[str], None] | None = None, **params: object) -> DenseHead:
    """Fit a head on cached features, as ``headstart train`` does, recording what it was trained on.

    Parameters
    ----------
    cache : str, Path or FeatureCache
        The feature cache (a folder or URL), or an open view of one of its datasets.
    layer : str
        The cached layer to train on: gap, pool5, ...
    kind : str
        The head: one of `headstart.heads.KINDS` (softmax, logistic, mlp).
    dataset : str, optional
        The dataset inside the cache, where it holds several.
    task : str, optional
        The task's name, kept in the head (default: the dataset's name).
    classes_map : dict, optional
        Cache class name -> task label, or None to leave a class out.
    train_split, valid_split : str
        The splits to train and to validate on.
    valid_fraction : float
        Held out of the train split where the dataset has no valid split, chosen by each image's content hash
        (and `seed`), so adding images never moves one between train and valid.
    seed : int
        The estimator's random_state and the hold-out's seed.
    drop_duplicates : bool
        Leave out images whose bytes are also in another split, or under another label.
    memory : int, optional
        Bytes the training features may take (default: half the memory available); softmax and mlp heads
        stream larger ones from the cache in blocks.
    augmented : bool
        Each epoch, train on one of each image's cached views (plain or augmented), drawn at random;
        validation always uses the plain view.
    log : callable, optional
        Called with each epoch's record (losses, accuracies, milliseconds).
    say : callable, optional
        Receives notes for the user: rows a classes map leaves out, duplicates found.
    **params
        The estimator's own parameters (epochs, lr, l2, hidden, ...).

    Returns
    -------
    DenseHead
        The fitted estimator, its labels the task's class names, with `meta_`: task, layer, the features'
        fingerprint, the row selection, row counts and the last epoch's metrics (what `save_head` keeps and
        `bundle` checks).

    Examples
    --------
    >>> head = hs.train_head("cache/features.zarr", "gap", "logistic")  # doctest: +SKIP
    >>> head.meta_["metrics"]["valid_accuracy"]  # doctest: +SKIP
    0.97
    """
    if kind not in KINDS:
        raise ValueError(f"unknown head {kind!r}; choose from {', '.join(KINDS)}")
    say = say or (lambda _: None)
    fc = cache if isinstance(cache, FeatureCache) and dataset in (None, cache.dataset) else \
        FeatureCache(getattr(cache, "path", cache), dataset)
    classes, y, selection, train, valid = task_rows(
        fc, classes_map=classes_map, train_split=train_split, valid_split=valid_split,
        valid_fraction=valid_fraction, seed=seed, drop_duplicates=drop_duplicates, say=say)
    names = np.array(classes)
    storage = np.float16 if fc.attrs.get("dtype") == "float16" else np.float32
    head = KINDS[kind](random_state=seed, **params)
    width = int(fc.root[f"features/{layer}"].shape[1]) if layer in fc.layers else 0
    need, memory = len(train) * width * np.dtype(storage).itemsize, memory or available_memory() // 2
    if augmented:
        if fc.view_rows.shape[1] == 0:
            raise ValueError(f"{fc.path}: dataset {fc.dataset!r} has no augmented views; extract it with --augment K")
        if not isinstance(head, SoftmaxHead | MLPHead):
            raise ValueError(f"--augmented needs a head trained by epochs (softmax or mlp), not {kind}")
        say(f"augmented: each epoch draws one of {fc.view_rows.shape[1] + 1} cached views of every training image")
        head.fit_blocks(_views(fc, layer, train, max(1, memory // (4 * width * 8)), storage), width,
                        names[y[train]], X_valid=fc.features(layer, valid), y_valid=names[y[valid]], log=log)
    elif need > memory:
        if not isinstance(head, SoftmaxHead | MLPHead):
            raise ValueError(f"the {kind} head needs its {need / 2**30:.2f} GiB of features in memory, over the "
                             f"{memory / 2**30:.2f} GiB budget; raise --memory, or use --head softmax or mlp, "
                             "which stream from the cache")
        # Blocks sized as if widened to float64 with two in flight (one read ahead): a margin that the float32
        # minibatches and the statistics' 64 MB sub-blocks stay inside.
        groups = fc.chunk_blocks(layer, train, max(1, memory // (4 * width * 8)))
        say(f"{need / 2**30:.2f} GiB of {layer} features exceed the {memory / 2**30:.2f} GiB memory budget: "
            f"streaming them from the cache in {len(groups)} blocks of up to {max(map(len, groups))} rows")
        head.fit_blocks(_streamed(fc, layer, train, groups, storage), width, names[y[train]],
                        X_valid=fc.features(layer, valid), y_valid=names[y[valid]], log=log)
    else:
        head.fit(fc.features(layer, train, storage), names[y[train]], X_valid=fc.features(layer, valid),
                 y_valid=names[y[valid]], log=log)
    last = head.history_[-1]
    head.meta_ = {
        "task": task or fc.dataset, "layer": layer, "fingerprint": fc.fingerprint, "selection": selection,
        "rows": {"train": int(len(train)), "valid": int(len(valid))},
        "metrics": {k: v for k, v in last.items() if k != "epoch"},
    }
    return head


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or 4 GiB where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 4 * 2**30


def _streamed(fc: FeatureCache, layer: str, entries: np.ndarray, groups: list[np.ndarray], dtype: type) -> Callable:
    """`blocks(rng)` for SoftmaxHead/MLPHead.fit_blocks: the chunk-aligned `groups` of `entries`, in a shuffled
    order, the next one read by a thread while the head trains on this one."""
    def blocks(rng: np.random.Generator | None):
        order = range(len(groups)) if rng is None else rng.permutation(len(groups))
        with ThreadPoolExecutor(1) as reader:
            pending = None
            for g in order:
                ahead = reader.submit(fc.features, layer, entries[groups[g]], dtype)
                if pending is not None:
                    yield pending
                pending = (groups[g], ahead.result())
            if pending is not None:
                yield pending

    return blocks


def _views(fc: FeatureCache, layer: str, entries: np.ndarray, block_rows: int, dtype: type) -> Callable:
    """`blocks(rng)` for fit_blocks: each entry's plain view when rng is None (the statistics), else a view
    drawn at random per entry and epoch among its plain and augmented ones."""
    def blocks(rng: np.random.Generator | None):
        rows, order = fc.entry_rows[entries], np.arange(len(entries))
        if rng is not None:
            rows, order = fc.draw_views(entries, rng), rng.permutation(len(entries))
        for i in range(0, len(entries), block_rows):
            pos = np.sort(order[i:i + block_rows])
            yield pos, fc.features_at(layer, rows[pos], dtype)

    return blocks


def evaluate(cache: str | Path, head: DenseHead, split: str | None = None
             ) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Score `head` on the rows it was validated on (or on `split`).

    Returns (metrics, y (n,) class indices, probabilities (n, n_classes), paths (n,) of the images scored).
    """
    meta = head.meta_
    sel = meta["selection"]
    fc = FeatureCache(cache, sel["dataset"])
    layer = meta["layer"]
    compatible(meta["fingerprint"], fc.fingerprint, str(fc.path), layer)
    classes, y = task_labels(fc.classes, fc.labels, sel["classes_map"])
    if classes != [str(c) for c in head.classes_]:
        raise ValueError(f"the task's classes in {fc.path} ({classes}) differ from the head's "
                         f"({head.classes_.tolist()})")
    if split is None:
        _, rows = select_rows(fc, y, sel)
    else:
        rows = np.flatnonzero((fc.splits == split) & (y >= 0))
    if len(rows) == 0:
        raise ValueError(f"{fc.path}: no labelled rows to evaluate on (split {split or sel['valid_split']!r})")
    proba = head.predict_proba(fc.features(layer, rows))
    result = metrics(y[rows], proba, classes)
    result.update({"task": meta["task"], "head": type(head).__name__, "layer": layer,
                   "split": split or (sel["valid_split"] if (fc.splits == sel["valid_split"]).any() else
                                      f"held-out {sel['valid_fraction']} of {sel['train_split']}")})
    return result, y[rows], proba, fc.paths[rows]


def confident_errors(y: np.ndarray, proba: np.ndarray, paths: np.ndarray, classes: list[str], n: int) -> list[dict]:
    """The `n` images the head gets most confidently wrong: path, actual, predicted, its probability."""
    pred = proba.argmax(1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:n]
    return [{"path": str(paths[i]), "actual": classes[y[i]], "predicted": classes[pred[i]],
             "probability": float(proba[i, pred[i]])} for i in wrong]


def write_errors(errors: list[dict], csv_path: Path | None, plot_path: Path | None, title: str) -> None:
    """The confident errors as CSV rows and as a contact sheet: each image with its true and predicted class."""
    if csv_path:
        import csv

        with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "actual", "predicted", "probability"])
            w.writeheader()
            w.writerows(errors)
    if plot_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        cols = min(6, max(1, len(errors)))
        rows = max(1, -(-len(errors) // cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows + 0.4), dpi=100, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, e in zip(axes.flat, errors, strict=False):
            try:  # read as extract read it: a path or a URL in an object store
                with Image.open(io.BytesIO(read_bytes(e["path"]))) as img:
                    ax.imshow(img.convert("RGB"))
            except (OSError, BadImage):
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            ax.set_title(f"{e['actual']} -> {e['predicted']}\np={e['probability']:.3f}", fontsize=8)
        fig.suptitle(title if errors else f"{title}: no errors", fontsize=9)
        fig.tight_layout()
        with atomic_write(plot_path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


def write_reports(result: dict, y: np.ndarray, pred: np.ndarray, metrics_path: Path | None = None,
                  details_path: Path | None = None, confusion_csv: Path | None = None,
                  confusion_png: Path | None = None) -> None:
    """Short metrics JSON for `dvc metrics` (accuracy, log loss, n), the rest (per class, confusion matrix,
    what was scored) in a second JSON, and the confusion matrix as CSV rows for `dvc plots` and as a PNG."""
    classes = list(result["per_class"])
    if metrics_path:
        with atomic_write(metrics_path) as tmp:
            tmp.write_text(json.dumps({k: result[k] for k in ("accuracy", "log_loss", "n")}, indent=2) + "\n")
    if details_path:
        with atomic_write(details_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    if confusion_csv:
        with atomic_write(confusion_csv) as tmp:
            tmp.write_text("actual,predicted\n" + "".join(f"{classes[a]},{classes[p]}\n"
                                                          for a, p in zip(y, pred, strict=True)))
    if confusion_png:
        with atomic_write(confusion_png) as tmp:
            plot_confusion(np.array(result["confusion_matrix"]), classes, tmp,
                           f"{result['task']} ({result['head']} on {result['layer']}): "
                           f"accuracy {result['accuracy']:.3f}")
