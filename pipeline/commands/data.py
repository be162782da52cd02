"""Commands around the project: ready datasets (data digits, data pets) and doctor."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import (
    shared,
)
from .common import write_json


@click.group()
def data() -> None:
    """Write a ready dataset as an image folder: digits (offline, built in) or pets (download)."""


@data.command("digits")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@shared("valid_fraction", default=0.2)
@shared("seed", default=0)
@click.option("--overwrite", "replace", is_flag=True,
              help="Delete OUT first when it holds an earlier digits folder (only that).")
def data_digits(out: Path, valid_fraction: float, seed: int, replace: bool) -> None:
    """scikit-learn's bundled 8x8 digits as PNGs in OUT/{train,valid}/<digit>/, plus OUT/parity.yaml."""
    from ..data import write_digits

    counts = write_digits(out, valid_fraction, seed, replace)
    click.echo(f"wrote {out}: {counts['train']} train and {counts['valid']} valid digits, 10 classes")


@data.command("pets")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--mirror", default=None, help="Base URL serving images.tar.gz and annotations.tar.gz.")
def data_pets(out: Path, mirror: str | None) -> None:
    """Oxford-IIIT Pet (download, md5-checked) in OUT/{train,valid}/<breed>/, plus OUT/species.yaml."""
    from ..data import PETS_URL, write_pets

    counts = write_pets(out, mirror or PETS_URL)
    click.echo(f"wrote {out}: {counts['train']} train and {counts['valid']} valid photos of 37 breeds")


@click.command()
@shared("json")
def doctor(json_out: Path | None) -> None:
    """What this machine offers headstart: versions, onnxruntime's providers (and whether CUDA really loads),
    the CPU's instruction sets, threads, and the folders in use."""
    from ..doctor import lines, report

    data = report()
    if not write_json(data, json_out):
        click.echo("\n".join(lines(data)))
