"""Commands that run the body over images: extract into the feature cache, verify it, predict."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import click

from ..options import (
    SIZE,
    WHERE,
    LazyChoice,
    Option,
    default_of,
    shared,
)
from .common import Failure

EXTRACT = "headstart.pipeline.extract"


@click.command()
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
def extract(data: str, body: Path, cache: str, dataset: str | None, batch_size: int, jobs: int, resize: str,
            storage_dtype: str, replace: bool, overwrite_dataset: bool, max_file_size: int,
            dask_address: str | None, augment: int, device: str) -> None:
    """Run the frozen body once over DATA and add the activations to the feature cache (created if new;
    resumable, content-addressed).

    DATA is DATA/<split>/<class>/*.jpg, DATA/<class>/*.jpg, a folder of unlabelled images, or a CSV manifest
    with columns path,label[,split]; a local path or a URL (s3://bucket/photos, with the s3 extra).
    """
    from ..cache import duplicates_line
    from ..distributed import dask_client
    from ..extract import extract as run

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


def _decode():
    import headstart.pipeline.decode as m

    return m


def _cache():
    import headstart.pipeline.cache as m

    return m


def _runtime_devices() -> tuple[str, ...]:
    from headstart.export.runtime import DEVICES

    return DEVICES


@click.command()
@shared("cache", default="cache/features.zarr")
def verify(cache: str) -> None:
    """Check every committed row of a feature cache (chunks present, checksums, statuses), like git fsck."""
    from ..cache import verify as check

    rows, problems = check(cache)
    for p in problems:
        click.echo(f"BROKEN {p}", err=True)
    if problems:
        raise Failure(f"{cache}: {len(problems)} problems in {rows} committed rows; extract again into a new "
                      "cache (the images are keyed by content, so nothing else is lost)")
    click.echo(f"{cache}: {rows} committed rows verified, no problems")

@click.command()
@click.argument("images", type=WHERE)
@shared("classifier", required=True)
@shared("output", default=Path("predictions.csv"))
@shared("batch_size", default=32)
@shared("jobs", default=2)
@click.option("--clip", help="LO,HI: clip probabilities, as log-loss submissions (Kaggle's dogs-vs-cats) want.")
@shared("dask")
@shared("device", lazy_default=lambda: _runtime_devices()[0])
def predict(images: str, classifier: Path, output: Path, batch_size: int, jobs: int, clip: str | None,
            dask_address: str | None, device: str) -> None:
    """Predict IMAGES (a folder or CSV manifest) with a bundled classifier into a CSV (--output), a row per
    image."""
    from headstart.export.progress import bar
    from headstart.heads.bundle import classifier_metadata

    from ..api import prediction_rows
    from ..dataset import scan
    from ..predict import check_clip, write_csv

    bounds = None
    if clip:
        try:
            lo, hi = (float(v) for v in clip.split(","))
        except ValueError:
            raise Failure(f"--clip {clip!r}: expected LO,HI such as 0.005,0.995") from None
        if not 0 <= lo < hi <= 1:
            raise Failure(f"--clip {clip!r}: need 0 <= LO < HI <= 1")
        bounds = (lo, hi)
    meta = classifier_metadata(classifier)
    classes, kind = meta["classes"], meta.get("task_kind", "classes")
    check_clip(meta, bounds, classifier, "--clip")
    images = scan(images)  # once: its length sizes the bar, its paths are what is predicted
    total = len(images)
    if dask_address:
        from ..distributed import dask_client

        with dask_client(dask_address) as client:
            rows = bar(prediction_rows(images, classifier, batch_size, jobs, device, bounds, client), total=total,
                       desc="predicting", unit="img")
            n, bad, shared_ids = write_csv(rows, output, classes, kind)
    else:
        rows = bar(prediction_rows(images, classifier, batch_size, jobs, device, bounds), total=total,
                   desc="predicting", unit="img")
        n, bad, shared_ids = write_csv(rows, output, classes, kind)
    for row in bad:
        click.echo(f"skipped {row['path']}: {row['error']}", err=True)
    for key, paths in list(shared_ids.items())[:5]:
        click.echo(f"id {key!r} is shared by {len(paths)} files: {', '.join(paths[:3])}", err=True)
    if shared_ids:
        click.echo(f"{len(shared_ids)} ids are shared by several files (the id is the file's stem); "
                   "the path column tells them apart", err=True)
    click.echo(f"wrote {output}: {n - len(bad)} predicted, {len(bad)} skipped")
