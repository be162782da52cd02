"""The audit command: label suspects, near-duplicates, leaks and outliers of a cached dataset, in one report."""

from __future__ import annotations

from pathlib import Path

import click

from headstart.export.progress import LOG

from ..options import FILE, Option, default_of, shared
from .common import write_json

AUDIT = "headstart.pipeline.audit"
PROBES = ("auto", "ridge", "logistic")  # ridge: the probe for large data, not a train head kind


@click.command()
@shared("cache", default="cache/features.zarr")
@shared("dataset", shown="the only one")
@shared("layer", default="gap")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Folds of the out-of-fold probabilities.")
@click.option("--probe", "kind", type=click.Choice(PROBES), default="auto", show_default=True,
              help="The head whose out-of-fold probabilities are read: auto (AutoHead's choice up to 5,000 "
                   "labelled images, the ridge probe above), ridge or logistic.")
@click.option("--threshold", type=click.FloatRange(-1, 1), cls=Option, lazy_default=default_of(AUDIT, "audit",
              "threshold"), show_default=True, help="Cosine similarity from which two images are near-duplicates.")
@click.option("--rank-by", type=click.Choice(["self_confidence", "normalized_margin"]), default="self_confidence",
              show_default=True, help="The order of the label suspects.")
@shared("memory", shown="half the memory available")
@shared("output", default=Path("audit.html"))
@shared("json")
@click.option("--write-exclude", type=FILE,
              help="Write the label suspects and the leaked copies outside the largest split, one path a line, "
                   "for `--exclude`; delete the lines of the images to keep.")
@shared("seed", default=0)
def audit(cache: str, dataset: str | None, layer: str, folds: int, kind: str, threshold: float, rank_by: str,
          memory: int | None, output: Path, json_out: Path | None, write_exclude: Path | None, seed: int) -> None:
    """Audit a cached dataset: label suspects (confident learning on out-of-fold probabilities), near-duplicates
    and leaks across splits, outliers; one offline HTML report (--output)."""
    from ..audit import audit as run
    from ..audit import summary_lines
    from ..audit import write_exclude as write_lines
    from ..report import write_report

    findings = run(cache, dataset, layer, folds, kind, memory, threshold, rank_by, seed=seed)
    size = write_report(findings, output)
    if write_exclude:
        n = write_lines(findings, write_exclude)
        LOG.info(f"wrote {write_exclude}: {n} paths")
    if write_json(findings, json_out):
        return
    click.echo("\n".join(summary_lines(findings)))
    click.echo(f"wrote {output} ({size / 2**20:.1f} MiB)")
