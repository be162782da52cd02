"""The bench commands: measured figures for the docs, each with the machine it ran on."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import (
    POSITIVE,
    shared,
)
from .common import write_json


@click.group()
def bench() -> None:
    """Measure: body speed, extract throughput, head training, and frozen epochs the two ways."""


def _report(rows: list[dict], columns: list[str], out: Path | None, title: str) -> None:
    from ..bench import machine, table

    if not write_json({"title": title, "machine": machine(), "rows": rows}, out):
        click.echo(f"{title}\nmachine: {machine()}\n\n{table(rows, columns)}")


@bench.command("body")
@shared("image_size", default=224)
@click.option("--batches", default="1,16", show_default=True, help="Comma-separated batch sizes to time.")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Timing per measurement.")
@shared("calibrate", shown="random pixels; speed does not depend on them")
@shared("body")
@shared("onnx")
@shared("json")
def bench_body(image_size: int, batches: str, seconds: float, calibrate: Path | None, body: Path | None,
               onnx_model: Path | None, json_out: Path | None) -> None:
    """The body on the CPU: float32 and int8 in onnxruntime, and torch eager on the same weights if installed;
    with --body, a wrapped body (`export --onnx`) with its model's GFLOP, and with --onnx the bare model beside."""
    from ..bench import bench_body as run

    if body is not None or onnx_model is not None:
        from ..bench import bench_wrapped

        if body is None:
            raise click.UsageError("--onnx needs --body, the body that wraps it")
        rows = bench_wrapped(body, onnx_model, tuple(int(b) for b in batches.split(",")), seconds)
        columns = ["image_size", "batch", "gflop", "wrapped_img_s"] + (["bare_img_s", "ratio"] if onnx_model else [])
        return _report(rows, columns, json_out, f"{body.name}, images/s ({rows[0]['versions']}; CPU: "
                       f"{rows[0]['cpu']})")

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
def bench_int8(data: Path, image_size: int, calibrate_count: int, seconds: float, json_out: Path | None) -> None:
    """int8 bodies with 8-bit and 7-bit weights against float32: gap cosine on DATA/valid photos, images/s."""
    from ..bench import bench_int8 as run

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
def bench_extract(data: Path, body: Path, cache: str, batch_size: int, jobs: int, json_out: Path | None) -> None:
    """End-to-end extract throughput beside the bare model's on pre-decoded arrays; --cache must be a new cache
    (the benchmark must compute every image)."""
    from ..bench import bench_extract as run

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
def bench_predict(data: Path, classifier: Path, counts: str, batch_size: int, json_out: Path | None) -> None:
    """Peak memory of predict on N and 10 N files: flat, since the reader bounds the images in flight."""
    from ..bench import bench_predict as run

    rows = run(data, classifier, tuple(int(c) for c in counts.split(",")), batch_size)
    _report(rows, ["files", "peak_rss_mib", "rss_vs_first", "seconds", "img_s"], json_out,
            "predict: peak resident memory by folder size")


@bench.command("heads")
@click.option("--rows", type=POSITIVE, default=25_000, show_default=True, help="Rows for the softmax heads.")
@shared("epochs", default=10)
@click.option("--mlp-rows", type=click.IntRange(min=0), default=1_999, show_default=True,
              help="Rows for the MLP on pool5 (0: leave it out); it trains 20 epochs.")
@shared("json")
def bench_heads(rows: int, epochs: int, mlp_rows: int, json_out: Path | None) -> None:
    """Head training on synthetic features: softmax on gap (rows x 512) and on pool5 at 224 px (rows x 25,088
    float16), and the default MLP on pool5 (mlp-rows x 25,088 float16); --epochs is the softmax heads'."""
    from ..bench import bench_heads as run

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
def bench_fewshot(cache: str, dataset: str | None, layer: str, sizes: str, draws: int, json_out: Path | None) -> None:
    """Every head, and auto, trained on N rows a class drawn from the train split, scored on the valid split:
    mean accuracy of the draws, with the 95% Wilson interval of one draw's."""
    from ..fewshot import fewshot

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
def bench_epochs(n_images: int, image_size: int, layer: str, data: Path | None, batch_size: int,
                 json_out: Path | None, plot: Path) -> None:
    """Why frozen epochs can be fast: a head epoch on cached features against the Keras way and full tuning."""
    from ..bench import bench_epochs as run
    from ..bench import plot_epochs

    rows = run(n_images, image_size, layer, data, batch_size)
    key = next(k for k in rows[0] if k.startswith("s_per_epoch_at_"))
    _report(rows, ["epoch", "images", "seconds", "img_s", "gflop_per_image", "speedup_of_cached", key], json_out,
            f"Seconds per epoch, VGG16 at {image_size} px, head on {layer}")
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_epochs(rows, plot)
    to_file = json_out is not None and str(json_out) != "-"
    click.echo(f"wrote {json_out} and {plot}" if to_file else f"wrote {plot}", err=json_out is not None and not to_file)


@bench.command("audit")
@click.option("--gap-rows", "rows", type=POSITIVE, default=25_000, show_default=True, help="Generated gap rows.")
@click.option("--probe", "kind", type=click.Choice(["auto", "ridge", "logistic"]), default="auto", show_default=True,
              help="The head whose out-of-fold probabilities are read: auto (AutoHead's choice up to 5,000 "
                   "labelled images, the ridge probe above), ridge or logistic.")
@shared("json")
def bench_audit(rows: int, kind: str, json_out: Path | None) -> None:
    """audit on a generated cache of --gap-rows 512-d gap rows with planted faults (5% flipped labels, 20 copies across
    splits): seconds by stage, and the share of the faults found."""
    from ..auditbench import bench_audit as run

    _report(run(rows, head=kind), ["rows", "head", "seconds", "cpu_seconds", "s_neighbours", "s_labels",
                                   "flipped_in_top_2x", "copies_found", "false_pairs"], json_out,
            "audit on generated gap rows")
