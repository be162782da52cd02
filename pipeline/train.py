"""Heads from the cache: training on the rows a Selection (pipeline.selection) picks, scoring, reports.

The estimators themselves (headstart.heads) take plain arrays; this module feeds them from a FeatureCache.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from headstart.export.errors import DataError, IncompatibleError, UsageError
from headstart.export.files import atomic_write
from headstart.export.fingerprint import compatible
from headstart.heads.kinds import KINDS
from headstart.heads.metrics import metrics, plot_confusion, wilson
from headstart.heads.models import DenseHead, EpochLog, MLPHead, SoftmaxHead

from .cache import FeatureCache
from .decode import BadImage, read_bytes
from .selection import Selection, select_rows, task_labels_of, task_rows
from .targets import Target


def train_head(cache: str | Path, layer: str = "gap", kind: str = "auto", selection: Selection | None = None, *,
               task: str | None = None, target: Target | None = None, memory: int | None = None,
               log: EpochLog | None = None, say: Callable[[str], None] | None = None, **params: object) -> DenseHead:
    """Fit a head on cached features, as ``headstart train`` does, recording what it was trained on.

    Parameters
    ----------
    cache : str, Path or FeatureCache
        The feature cache (a folder or URL), or an open view of one of its datasets.
    layer : str
        The cached layer to train on: gap, pool5, ...
    kind : str
        The head: one of `headstart.heads.KINDS` (softmax, logistic, mlp).
    selection : Selection, optional
        The rows and labels to train on: dataset, splits, valid fraction, seed (also the estimator's
        random_state), classes map, exclusions, relabels, augmented views. Its fields may also be given as
        keywords (``valid_fraction=0``), which replace the selection's.
    task : str, optional
        The task's name, kept in the head (default: the dataset's name).
    target : Target, optional
        A task of tags or of a value an image (pipeline.targets: a manifest column, or a tags map) instead of
        the class labels; `kind` is then one of `headstart.heads.kinds.TASK_KINDS[target.kind]`.
    memory : int, optional
        Bytes the training features may take (default: half the memory available); softmax and mlp heads
        stream larger ones from the cache in blocks.
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
    if kind not in KINDS and target is None:
        raise UsageError(f"unknown head {kind!r}; choose from {', '.join(KINDS)}")
    say = say or (lambda _: None)
    selection = Selection.take(selection, params)
    dataset = selection.dataset
    fc = cache if isinstance(cache, FeatureCache) and dataset in (None, cache.dataset) else \
        FeatureCache(getattr(cache, "path", cache), dataset)
    if target is not None:
        from .tasks import train_task_head

        return train_task_head(fc, layer, kind, selection, target, task=task, log=log, say=say, **params)
    classes, y, record, train, valid = task_rows(fc, selection, say)
    names = np.array(classes)
    storage = np.float16 if fc.attrs.get("dtype") == "float16" else np.float32
    head = KINDS[kind](random_state=selection.seed, **params)
    width = int(fc.root[f"features/{layer}"].shape[1]) if layer in fc.layers else 0
    need, memory = len(train) * width * np.dtype(storage).itemsize, memory or available_memory() // 2
    if selection.augmented:
        if fc.view_rows.shape[1] == 0:
            raise DataError(f"{fc.path}: dataset {fc.dataset!r} has no augmented views; extract it with --augment K")
        if not isinstance(head, SoftmaxHead | MLPHead):
            raise UsageError(f"--augmented needs a head trained by epochs (softmax or mlp), not {kind}")
        say(f"augmented: each epoch draws one of {fc.view_rows.shape[1] + 1} cached views of every training image")
        head.fit_blocks(_views(fc, layer, train, max(1, memory // (4 * width * 8)), storage), width,
                        names[y[train]], X_valid=fc.features(layer, valid), y_valid=names[y[valid]], log=log)
    elif need > memory:
        if not isinstance(head, SoftmaxHead | MLPHead):
            raise UsageError(f"the {kind} head needs its {need / 2**30:.2f} GiB of features in memory, over the "
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
        "task": task or fc.dataset, "layer": layer, "fingerprint": fc.fingerprint, "selection": record,
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


def evaluate(cache: str | Path, head: DenseHead, split: str | None = None, selection: Selection | None = None
             ) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Score `head` on the rows it was validated on (or on `split`), under the labels it was trained for.

    `selection`: the rows and labels to score (default: the head's own, recorded when it was trained: its
    dataset, classes map, exclusions and relabels).
    Returns (metrics, y (n,) class indices, probabilities (n, n_classes), paths (n,) of the images scored).
    """
    meta = head.meta_
    sel = selection or Selection.from_record(meta["selection"])
    fc = FeatureCache(cache, sel.dataset)
    layer = meta["layer"]
    compatible(meta["fingerprint"], fc.fingerprint, str(fc.path), layer)
    classes, y = task_labels_of(fc, sel)
    if classes != [str(c) for c in head.classes_]:
        raise IncompatibleError(f"the task's classes in {fc.path} ({classes}) differ from the head's "
                                f"({head.classes_.tolist()})")
    if split is None:
        _, rows = select_rows(fc, y, sel)
    else:
        rows = np.flatnonzero((fc.splits == split) & (y >= 0))
    if len(rows) == 0:
        raise DataError(f"{fc.path}: no labelled rows to evaluate on (split {split or sel.valid_split!r})")
    proba = head.predict_proba(fc.features(layer, rows))
    result = metrics(y[rows], proba, classes)
    result["accuracy_interval"] = list(wilson(int(round(result["accuracy"] * len(rows))), len(rows)))
    result.update({"task": meta["task"], "head": type(head).__name__, "layer": layer,
                   "split": split or (sel.valid_split if (fc.splits == sel.valid_split).any() else
                                      f"held-out {sel.valid_fraction} of {sel.train_split}")})
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
