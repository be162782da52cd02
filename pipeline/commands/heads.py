"""Commands that train and score heads on the feature cache: train, tune, sweep, evaluate."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from headstart.export.progress import LOG

from ..options import (
    FILE,
    POSITIVE,
    SELECTION,
    LazyChoice,
    Option,
    default_of,
    per_kind,
    selection_options,
    shared,
)
from .common import Failure, epoch_line, say, write_json

if TYPE_CHECKING:
    from ..selection import Selection

TRAIN = "headstart.pipeline.train"
TUNE = "headstart.pipeline.tune"


@click.command()
@shared("cache", default="cache/features.zarr")
@shared("layer", lazy_default=default_of(TRAIN, "train_head", "layer"))
@shared("head", default="auto")
@click.option("--calibration", type=click.Choice(["temperature", "none"]), cls=Option, shown=per_kind("calibrate"),
              help="Temperature scaling of the head's probabilities, fitted on rows it did not train on "
                   "(out-of-fold or held out); none turns it off.")
@shared("output", required=True)
@shared("epochs", shown=per_kind("epochs"))
@shared("lr", shown=per_kind("lr"))
@shared("minibatch", shown=per_kind("batch_size"))
@shared("l2", shown=per_kind("l2"))
@shared("hidden", shown=per_kind("hidden"))
@click.option("--dropout", type=float, cls=Option, shown=per_kind("dropout"),
              help="Dropout after each hidden layer of an mlp head.")
@click.option("--patience", type=POSITIVE, help="Adam heads: stop after N epochs without improvement on rows held "
                                                "out of train, keeping the best epoch's weights.")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True)
@click.option("--standardize/--no-standardize", default=True, show_default=True)
@shared("memory", shown="half the memory available")
@selection_options()
@shared("task")
@shared("tags")
@shared("tags_map")
@shared("target")
@shared("manifest")
@shared("history")
def train(cache: str, layer: str, kind: str, calibration: str | None, output: Path, epochs: int | None,
          lr: float | None, minibatch: int | None, l2: float | None, hidden: str | None, dropout: float | None,
          patience: int | None, class_weight: str, standardize: bool, memory: int | None, selection: Selection,
          task: str | None, tags_column: str | None, tags_map: Path | None, target: str | None,
          manifest: str | None, history: Path | None) -> None:
    """Train a replacement head on cached features, in seconds: by default (auto) the best of several
    candidates, chosen by cross-validation on the training rows and refit on all of them.

    The held-out valid share (--valid-fraction, where the cache has no valid split) is chosen by each image's
    content hash and --seed, so adding images never moves one between train and valid.

    --tags, --tags-map or --target train a head of several tags or of a number an image instead, on the same
    features (auto: per-tag logistic regression, or ridge, their penalty chosen by cross-validation).
    """
    import time

    from headstart.heads.headfile import save_head
    from headstart.heads.kinds import KINDS, TASK_KINDS, kind_name

    from ..targets import target_of
    from ..train import train_head

    answers = target_of(tags_column, tags_map, target, manifest)
    registry = KINDS if answers is None else TASK_KINDS[answers.kind]
    if kind not in registry:
        raise click.UsageError(f"--head {kind}: a {answers.kind if answers else 'classes'} task takes "
                               f"{', '.join(registry)}")
    if answers is not None and class_weight != "none":
        raise click.UsageError("--class-weight weighs the classes of a head of classes; a tags or value task has none")
    sizes = _sizes(hidden)
    given = {"epochs": epochs, "lr": lr, "batch_size": minibatch, "l2": l2, "hidden": sizes, "dropout": dropout,
             "patience": patience, "standardize": standardize,
             "class_weight": None if class_weight == "none" else class_weight, "calibrate": calibration}
    flags = {"batch_size": "minibatch", "calibrate": "calibration"}
    accepted = inspect.signature(registry[kind]).parameters
    ctx = click.get_current_context()
    ignored = [k for k, v in given.items() if v is not None and k not in accepted and k != "class_weight"
               and ctx.get_parameter_source(flags.get(k, k)) is click.core.ParameterSource.COMMANDLINE]
    if ignored:
        raise click.UsageError(f"--head {kind} takes no "
                               f"{', '.join('--' + flags.get(k, k).replace('_', '-') for k in ignored)}")
    params = {k: v for k, v in given.items() if k in accepted and v is not None}

    t0 = time.perf_counter()
    head = train_head(cache, layer, kind, selection, task=task, target=answers, memory=memory, log=epoch_line,
                      say=say, **params)
    save_head(head, output)
    _write_history(head, history)
    if answers is not None:
        m, rows = head.meta_["metrics"], head.meta_["rows"]
        shown = ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in m.items() if k != "valid_n")
        name = kind if kind != "auto" else f"auto ({kind_name(head)})"
        n = len(head.outputs_)
        click.echo(f"{head.meta_['task']}: {name} {answers.kind} head on {layer} ({head.n_features_in_} features, "
                   f"{n} {('tag' if answers.kind == 'tags' else 'target') + ('s' if n > 1 else '')}: "
                   f"{', '.join(head.outputs_)}), {rows['train']} train / {rows['valid']} valid rows: "
                   f"{shown or 'no valid rows'}, trained in {time.perf_counter() - t0:.2f} s -> {output}")
        return
    if hasattr(head, "cv_results_"):
        _print_choice(head)
    m, rows = head.meta_["metrics"], head.meta_["rows"]
    click.echo(f"{head.meta_['task']}: {kind} head on {layer} ({head.n_features_in_} features, "
               f"{len(head.classes_)} classes), {rows['train']} train / {rows['valid']} valid rows: "
               f"valid accuracy {m.get('valid_accuracy', float('nan')):.4f}, "
               f"trained in {time.perf_counter() - t0:.2f} s -> {output}")


def _kinds_list() -> list[str]:
    from headstart.heads.kinds import KINDS

    return list(KINDS)


def _sizes(hidden: str | None) -> tuple[int, ...] | None:
    try:
        return None if hidden is None else tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise Failure(f"--hidden {hidden!r}: expected comma-separated layer sizes such as 256 or 512,128") from None


@click.command()
@shared("cache", default="cache/features.zarr")
@shared("body", default=Path("models/vgg16.onnx"))
@shared("layer", default="pool4")
@click.option("--unfreeze", type=click.IntRange(1, 3), cls=Option,
              lazy_default=default_of(TUNE, "tune_head", "unfreeze"), show_default=True,
              help="How many of block 5's last convolutions to train.")
@click.option("--pooling", type=LazyChoice(lambda: _tuned().POOLINGS), cls=Option,
              lazy_default=default_of(TUNE, "tune_head", "pooling"), show_default=True,
              help="After pool5: its global average, or all of it flattened.")
@shared("head", default="softmax")
@shared("hidden", shown="256 (mlp)")
@shared("epochs", lazy_default=default_of(TUNE, "tune_head", "epochs"))
@shared("lr", lazy_default=default_of(TUNE, "tune_head", "lr"))
@click.option("--conv-lr", type=float, cls=Option, lazy_default=default_of(TUNE, "tune_head", "conv_lr"),
              show_default=True, help="Adam learning rate of the convolutions, lower: they start from ImageNet.")
@shared("minibatch", lazy_default=default_of(TUNE, "tune_head", "batch_size"))
@shared("l2", lazy_default=default_of(TUNE, "tune_head", "l2"))
@selection_options()
@shared("task")
@shared("output", required=True)
@shared("history")
def tune(cache: str, body: Path, layer: str, unfreeze: int, pooling: str, kind: str, hidden: str | None,
         epochs: int, lr: float, conv_lr: float, minibatch: int, l2: float, selection: Selection, task: str | None,
         output: Path, history: Path | None) -> None:
    """Fine-tune the last 1-3 convolutions of block 5 and a head on cached pool4 (PyTorch; the tune extra).

    --body is the float32 body whose block-5 weights start the tuning: the one that made the cache.
    """
    from headstart.heads.headfile import save_head

    from ..tune import tune_head

    if layer != "pool4":
        raise click.UsageError(f"--layer {layer}: tune starts from the cached pool4")
    if kind not in ("softmax", "mlp"):
        raise click.UsageError(f"--head {kind}: tune trains a softmax or an mlp head")
    sizes = (_sizes(hidden or "256") or ()) if kind == "mlp" else ()  # an mlp needs a hidden layer: 256 unless given
    head = tune_head(cache, body, selection, unfreeze=unfreeze, pooling=pooling, hidden=sizes, epochs=epochs, lr=lr,
                     conv_lr=conv_lr, batch_size=minibatch, l2=l2, task=task, log=epoch_line, say=say)
    save_head(head, output)
    _write_history(head, history)
    m = head.meta_["metrics"]
    click.echo(f"{head.meta_['task']}: conv5 (last {unfreeze}) + {kind} head on {layer}: valid accuracy "
               f"{m.get('valid_accuracy', float('nan')):.4f} -> {output}")


def _tuned():
    import headstart.heads.tuned as m

    return m


def _print_choice(head) -> None:
    from ..bench import table

    cv = head.cv_
    click.echo(f"auto: {cv['method']} of {cv['rows']} training rows (seed {cv['seed']}); out-of-fold scores, "
               "accuracy with its 95% interval:")
    click.echo(table(head.table(), ["candidate", "cv_log_loss", "cv_accuracy", "chosen"]))
    click.echo(f"auto: {head.winner_}, refit on all training rows, temperature {head.temperature_:.3g}")


def _write_history(head, path: Path | None) -> None:
    if path:
        from headstart.export.files import atomic_write

        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(head.history_, indent=1) + "\n")


@click.command()
@shared("cache", default="cache/features.zarr")
@shared("layers", lazy_default=default_of(TRAIN, "train_head", "layer"))
@click.option("--heads", "kinds", cls=Option, lazy_default=lambda: ",".join(_kinds_list()), show_default=True,
              help="Comma-separated head kinds.")
@shared("l2", grid=True, shown="each head's own")
@shared("lr", grid=True, shown="each head's own")
@shared("epochs", grid=True, shown="each head's own")
@click.option("--parallel", type=POSITIVE, default=1, show_default=True, help="Sweep trials trained at once.")
@selection_options(*(n for n in SELECTION if n != "augmented"))
@shared("json")
@click.option("--save-best", type=FILE, help="Save the best head here.")
@click.option("--select-on", help="Rank on this split's rows (default: 5-fold cross-validation on the training "
                                  "rows); never the split that evaluate reports.")
def sweep(cache: str, layers: str, kinds: str, l2: list[float] | None, lr: list[float] | None,
          epochs: list[int] | None, parallel: int, selection: Selection, json_out: Path | None,
          save_best: Path | None, select_on: str | None) -> None:
    """Train every combination of layers, heads and hyper-parameters on one cache; a table sorted by the
    cross-validated accuracy on the training rows (the validation scores beside it are not used to rank).

    --l2, --lr and --epochs take comma-separated values to try (softmax and mlp heads take --lr and --epochs).
    """
    from headstart.heads.headfile import save_head

    from ..bench import table
    from ..sweep import sweep as run

    grid = {"l2": l2 or [], "lr": lr or [], "epochs": epochs or []}
    rows, best = run(cache, [x.strip() for x in layers.split(",") if x.strip()],
                     [x.strip() for x in kinds.split(",") if x.strip()], grid, selection, jobs=parallel,
                     select_on=select_on)
    shown = [r | {"params": " ".join(f"{k}={v:g}" for k, v in r["params"].items()) or "defaults",
                  "valid_95": "" if r["valid_low"] is None else f"[{r['valid_low']:.3f}, {r['valid_high']:.3f}]"}
             for r in rows]
    to_stdout = write_json(rows, json_out)
    if not to_stdout:
        ranked = f"split {select_on!r}" if select_on else "out-of-fold scores of the training rows"
        click.echo(f"ranked on {ranked}; valid_* are the refit heads' scores on the validation rows, not used to rank")
        click.echo(table(shown, ["layer", "head", "params", "select_accuracy", "select_loss", "valid_accuracy",
                                 "valid_95", "valid_loss", "seconds"]))
    if save_best:
        save_head(best, save_best)
        click.echo(f"best: {shown[0]['head']} on {shown[0]['layer']} ({shown[0]['params']}) -> {save_best}",
                   err=to_stdout)


@click.command()
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="the head's own")
@shared("head_file", required=True)
@click.option("--split", help="Split to score (default: the rows the head was validated on).")
@click.option("--metrics", type=FILE, help="Write the short metrics JSON here, for `dvc metrics`: accuracy, log "
                                           "loss, n (tags: mAP, micro and macro F1; a value: R2, MAE, RMSE).")
@click.option("--details", type=FILE, help="Write every metric as JSON here: per class precision/recall and the "
                                           "confusion matrix, or per tag AP and F1.")
@click.option("--confusion", type=FILE, help="Write (actual, predicted) rows as CSV here, for `dvc plots` (tags: "
                                             "tag,actual,predicted; a value: the two numbers).")
@shared("plot")
@click.option("--predictions", type=FILE,
              help="Write one CSV row per scored image here: path, split, label, predicted, a probability per class.")
@click.option("--errors", "n_errors", type=click.IntRange(min=0), default=0,
              help="List the N images the head gets most confidently wrong.")
@click.option("--errors-plot", type=FILE, help="Draw them as a contact sheet (PNG) here.")
@click.option("--errors-csv", type=FILE, help="Write them as CSV here.")
@click.option("--reliability", type=FILE, help="Draw the reliability diagram (PNG) here: accuracy against "
                                               "confidence in 15 bins, as the calibration error is computed.")
@shared("exclude")
@shared("relabel")
@shared("manifest")
@shared("json")
def evaluate(cache: str, dataset: str | None, head_path: Path, split: str | None, metrics: Path | None,
             details: Path | None, confusion: Path | None, plot: Path | None, predictions: Path | None,
             n_errors: int, errors_plot: Path | None, errors_csv: Path | None, reliability: Path | None,
             exclude: Path | None, relabel: Path | None, manifest: str | None, json_out: Path | None) -> None:
    """Score a head on cached features: accuracy with its 95% Wilson interval, log loss, calibration (ECE, Brier),
    per-class precision/recall, confusion matrix (--plot draws it). A tags head: mAP, F1, each tag's AP (--plot:
    precision-recall curves); a value head: R2, MAE, RMSE (--plot: predicted against true).

    By default the rows and labels the head was validated on: its dataset, exclusions and relabels.
    """
    from headstart.heads.headfile import load_head

    from ..options import build_selection
    from ..selection import Selection
    from ..train import confident_errors, write_errors, write_reports
    from ..train import evaluate as score

    head = load_head(head_path)
    # The head's own rows and labels (its recorded exclusions and relabels), unless these are given
    given = {k: v for k, v in (("dataset", dataset), ("exclude", exclude), ("relabel", relabel)) if v is not None}
    selection = build_selection(given, Selection.from_record(head.meta_["selection"]))
    if "target" in head.meta_:
        extra = [f for f, v in (("--predictions", predictions), ("--errors", n_errors), ("--errors-plot", errors_plot),
                                ("--errors-csv", errors_csv), ("--reliability", reliability)) if v]
        if extra:
            raise click.UsageError(f"{', '.join(extra)}: reports of a head of classes; {head_path} is a "
                                   f"{head.meta_['target']['kind']} head")
        _evaluate_task(cache, head, split, selection, manifest, metrics, details, confusion, plot, json_out)
        return
    if manifest is not None:
        raise click.UsageError(f"--manifest is for a tags or value head; {head_path} is a head of classes")
    result, y, proba, paths = score(cache, head, split, selection)
    write_reports(result, y, proba.argmax(1), metrics, details, confusion, plot)
    errors = confident_errors(y, proba, paths, list(result["per_class"]), n_errors)
    write_errors(errors, errors_csv, errors_plot, f"{result['task']}: the {len(errors)} most confident errors")
    if reliability:
        from ..reliability import plot_reliability

        plot_reliability(y, proba, reliability, f"{result['task']} ({result['head']} on {result['layer']})")
    if predictions:
        from ..scores import write_predictions

        n = write_predictions(predictions, cache, selection.dataset, paths, y, proba,
                              list(result["per_class"]))
        LOG.info(f"wrote {predictions}: {n} scored images")
    if write_json(result, json_out):
        return
    low, high = result["accuracy_interval"]
    click.echo(f"{result['task']}: {result['head']} on {result['layer']}, {result['split']}: accuracy "
               f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}] on {result['n']} rows, log loss "
               f"{result['log_loss']:.4f}, ECE {result['ece']:.4f}, Brier {result['brier']:.4f}")
    for c, r in result["per_class"].items():
        click.echo(f"  {c}: precision {r['precision']:.3f} recall {r['recall']:.3f} (n={r['support']})")
    for e in errors:
        click.echo(f"  wrong: {e['path']}: {e['actual']} taken for {e['predicted']} (p={e['probability']:.3f})")


def _evaluate_task(cache: str, head, split: str | None, selection: Selection, manifest: str | None,
                   metrics: Path | None, details: Path | None, pairs: Path | None, plot: Path | None,
                   json_out: Path | None) -> None:
    """evaluate for a tags or value head: mAP and F1, or MAE, RMSE and R2; --plot draws precision-recall curves
    or predicted against true values."""
    from ..tasks import evaluate_task, shown, write_task_reports

    result, Y, out, _ = evaluate_task(cache, head, split, selection, manifest)
    write_task_reports(result, Y, out, head, metrics, details, pairs, plot)
    if write_json(result, json_out):
        return
    where = f"{result['task']}: {result['head']} on {result['layer']}, {result['split']}, {result['n']} rows"
    if result["task_kind"] == "value":
        click.echo(f"{where}: R2 {shown(result['r2'])}, MAE {result['mae']:.4g}, RMSE {result['rmse']:.4g}")
        return
    low, high = result["cell_accuracy_interval"]
    click.echo(f"{where}: mAP {shown(result['mAP'])}, micro F1 {result['micro_f1']:.3f}, macro F1 "
               f"{result['macro_f1']:.3f}; decisions right {result['cell_accuracy']:.3f} [{low:.3f}, {high:.3f}]")
    for t, r in result["per_tag"].items():
        ap = "-" if r["ap"] is None else f"{r['ap']:.3f}"
        click.echo(f"  {t}: AP {ap}, F1 {r['f1']:.3f}")

