"""Heads of tags and values (pipeline.targets) from the cache: training, scoring and reports.

The classes' counterparts live in pipeline/train.py; these read a Target's answers instead of the class labels,
on the same rows a Selection picks.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from headstart.export.errors import DataError, IncompatibleError, UsageError
from headstart.export.files import atomic_write
from headstart.export.fingerprint import compatible
from headstart.export.progress import LOG
from headstart.heads.kinds import TASK_KINDS
from headstart.heads.metrics import wilson
from headstart.heads.regression import regression_metrics
from headstart.heads.tags import tag_metrics

from .cache import FeatureCache
from .selection import Selection, excluded, select_rows
from .targets import Answers, Target, target_values


def target_rows(fc: FeatureCache, selection: Selection, target: Target, say: Callable[[str], None] = lambda _: None
                ) -> tuple[Answers, np.ndarray, np.ndarray]:
    """(the answers for every entry, `known` less the exclusions; train entries; valid entries) of a tags or
    value task."""
    if selection.augmented:
        raise UsageError("--augmented trains heads of classes by epochs; a tags or value head trains on each image's "
                         "plain view")
    if selection.classes_map is not None or selection.relabel:
        raise UsageError("--classes-map and --relabel change class labels; a tags or value task reads its answers "
                         f"from {target.describe()} instead: edit them there")
    answers = target_values(fc, target)
    names, Y = answers.names, answers.Y
    outside = int((~answers.known).sum())
    known = answers.known & ~excluded(fc, selection, say)  # counted apart: it says so itself
    if outside:
        why = (f"have no {target.column}" if target.kind == "value" else "are not in the manifest"
               if target.column else "are of classes the tags map does not name")
        say(f"{outside} of {len(known)} rows {why}: left out of the task")
    train, valid = select_rows(fc, np.where(known, 0, -1), selection)
    if target.kind == "tags":
        never = [t for j, t in enumerate(names) if not Y[train, j].any()]
        if never:
            say(f"tag(s) {', '.join(never)} occur on no training row: the head learns to leave them off")
    elif np.ptp(Y[train]) == 0:
        raise DataError(f"{target.describe()}: every training row has the same {target.column} ({Y[train][0]:g}): "
                        "there is nothing to learn; check the column")
    return answers._replace(known=known), train, valid


def train_task_head(fc: FeatureCache, layer: str, kind: str, selection: Selection, target: Target, *,
                    task: str | None = None, log: Callable[[dict], None] | None = None,
                    say: Callable[[str], None] = lambda _: None, **params: object):
    """Fit the `kind` head of a tags or value task on `layer`, recording what it was trained on (as train_head)."""
    kinds = TASK_KINDS[target.kind]
    if kind not in kinds:
        raise UsageError(f"--head {kind} is a head of classes; a {target.kind} task takes {', '.join(kinds)}")
    answers, train, valid = target_rows(fc, selection, target, say)
    names, Y = answers.names, answers.Y
    head = kinds[kind](**params)
    if "random_state" in head.get_params():
        head.set_params(random_state=selection.seed)
    X, X_valid = fc.features(layer, train), fc.features(layer, valid)
    by_epoch = {}  # the Adam heads score the valid rows after each epoch, for the log and --history
    if "log" in inspect.signature(head.fit).parameters and len(valid):
        by_epoch = {"X_valid": X_valid, "Y_valid" if target.kind == "tags" else "y_valid": Y[valid], "log": log}
    if target.kind == "tags":
        head.fit(X, Y[train], tags=names, **by_epoch)
    else:
        head.fit(X, Y[train], **by_epoch)
    head.outputs_ = names
    scores = score(head, X_valid, Y[valid], target.kind, names) if len(valid) else {}
    head.meta_ = {"task": task or fc.dataset, "layer": layer, "fingerprint": fc.fingerprint,
                  "selection": selection.record(fc.dataset),
                  "target": target.record() | {"manifest_sha256": answers.digest},
                  "rows": {"train": int(len(train)), "valid": int(len(valid))},
                  "metrics": {f"valid_{k}": scores[k] for k in HEADLINE[target.kind] if k in scores}}
    if not getattr(head, "history_", None):  # the probes fit in one go: their record is the final scores
        head.history_ = [{"epoch": 0, **head.meta_["metrics"]}]
    return head


# The metrics `dvc metrics` shows and a head file keeps, per task kind.
HEADLINE = {"tags": ("mAP", "micro_f1", "macro_f1", "n"), "value": ("r2", "mae", "rmse", "n")}


def score(head, X: np.ndarray, Y: np.ndarray, task_kind: str, names: list[str]) -> dict:
    """The task's metrics of `head` on rows X with answers Y; None where undefined (R2 of a constant, the AP of
    a tag that never occurs): JSON has no NaN."""
    if task_kind == "tags":
        return _defined(tag_metrics(Y, head.predict_proba(X), head.predict(X), names))
    return _defined(regression_metrics(Y, head.predict(X)))


def _defined(value: object) -> object:
    if isinstance(value, dict):
        return {k: _defined(v) for k, v in value.items()}
    return None if isinstance(value, float) and not np.isfinite(value) else value


def evaluate_task(cache: str | Path, head, split: str | None = None, selection: Selection | None = None,
                  manifest: str | None = None) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Score a tags or value head on the rows it was validated on (or on `split`), under its recorded Target.

    `manifest`: read the column from this manifest instead of the one recorded (moved, or a new version).
    Returns (metrics, Y of the rows scored, the head's output on them (tag probabilities or values), paths).
    """
    meta = head.meta_
    sel = selection or Selection.from_record(meta["selection"])
    target = Target.from_record(meta["target"])
    if manifest is not None:
        target = dataclasses.replace(target, manifest=manifest)
    fc = FeatureCache(cache, sel.dataset)
    layer = meta["layer"]
    compatible(meta["fingerprint"], fc.fingerprint, str(fc.path), layer)
    names, Y, known, digest = target_values(fc, target)
    recorded = meta["target"].get("manifest_sha256")
    if recorded and manifest is None and digest != recorded:
        LOG.warning(f"{target.manifest or fc.summary.get('source')} changed since the head was trained: scoring "
                    "against its answers as they are now")
    if target.kind == "tags" and names != list(head.outputs_):
        raise IncompatibleError(f"the tags of {target.describe()} ({', '.join(names)}) differ from the head's "
                                f"({', '.join(head.outputs_)}); score it on the tags it was trained for, or train "
                                "it again")
    known &= ~excluded(fc, sel)
    if split is None:
        _, rows = select_rows(fc, np.where(known, 0, -1), sel)
    else:
        rows = np.flatnonzero((fc.splits == split) & known)
    if len(rows) == 0:
        raise DataError(f"{fc.path}: no rows with answers to evaluate on in split {split or sel.valid_split!r} "
                        f"(splits: {', '.join(sorted(set(fc.splits)))})")
    X = fc.features(layer, rows)
    result = score(head, X, Y[rows], target.kind, names)
    out = head.predict_proba(X) if target.kind == "tags" else head.predict(X)
    if target.kind == "tags":  # each (row, tag) decision right or wrong, with its interval
        right = int((head.predict(X) == Y[rows].astype(bool)).sum())
        result["cell_accuracy"], result["cell_accuracy_interval"] = right / Y[rows].size, list(
            wilson(right, Y[rows].size))
    result.update({"task": meta["task"], "task_kind": target.kind, "head": type(head).__name__, "layer": layer,
                   "outputs": names,
                   "split": split or (sel.valid_split if (fc.splits == sel.valid_split).any() else
                                      f"held-out {sel.valid_fraction} of {sel.train_split}")})
    return result, Y[rows], out, fc.paths[rows]


def write_task_reports(result: dict, Y: np.ndarray, out: np.ndarray, head, metrics_path: Path | None = None,
                       details_path: Path | None = None, pairs_csv: Path | None = None,
                       plot_path: Path | None = None) -> None:
    """Headline metrics JSON, details JSON, (actual, predicted) CSV rows and a plot: predicted against true
    values (a value task), or each tag's precision-recall curve (tags)."""
    kind = result["task_kind"]
    if metrics_path:
        with atomic_write(metrics_path) as tmp:
            tmp.write_text(json.dumps({k: result[k] for k in HEADLINE[kind]}, indent=2) + "\n")
    if details_path:
        with atomic_write(details_path) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    if pairs_csv:
        with atomic_write(pairs_csv) as tmp:
            if kind == "value":  # repr: every digit, as the manifest and the head have them
                tmp.write_text("actual,predicted\n" + "".join(f"{float(a)!r},{float(p)!r}\n" for a, p in
                                                              zip(Y.ravel(), out.ravel(), strict=True)))
            else:
                on = out >= head.thresholds_
                tags = result["outputs"]
                tmp.write_text("tag,actual,predicted\n" + "".join(
                    f"{t},{int(Y[i, j])},{int(on[i, j])}\n" for i in range(len(Y)) for j, t in enumerate(tags)))
    if plot_path:
        _plot(result, Y, out, plot_path)


def _plot(result: dict, Y: np.ndarray, out: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    title = f"{result['task']} ({result['head']} on {result['layer']}), {result['n']} rows"
    if result["task_kind"] == "value":
        y, p = Y.ravel(), out.ravel()
        ax.scatter(y, p, s=8, alpha=0.6)
        low, high = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.set(xlabel=f"true {result['outputs'][0]}", ylabel="predicted",
               title=f"{title}\nR2 {shown(result['r2'])}, MAE {result['mae']:.3g}")
    else:
        from sklearn.metrics import precision_recall_curve

        for j, t in enumerate(result["outputs"]):
            if Y[:, j].any():
                precision, recall, _ = precision_recall_curve(Y[:, j], out[:, j])
                ax.plot(recall, precision, label=f"{t} (AP {shown(result['per_tag'][t]['ap'])})")
        ax.set(xlabel="recall", ylabel="precision", title=f"{title}\nmAP {shown(result['mAP'])}")
        ax.legend(fontsize=8)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def shown(value: float | None) -> str:
    """A score to 3 decimals, '-' where it is undefined (R2 of a constant target, mAP without tags)."""
    return "-" if value is None else f"{value:.3f}"
