"""What every command shares: the one-line error, status lines, JSON output, the per-epoch line."""

from __future__ import annotations

import json
from pathlib import Path

import click

from headstart.export.progress import LOG


class Failure(click.ClickException):
    """A one-line error for the user: no traceback."""


def say(text: str) -> None:
    """A status line (hidden by -q)."""
    LOG.info(text)


def write_json(data: object, out: Path | None) -> bool:
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


def epoch_line(rec: dict) -> None:
    """One training epoch as a status line."""
    if "train_accuracy" not in rec:  # a head of tags or values: its own measures
        shown = "  ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in rec.items() if k not in ("epoch", "ms"))
        LOG.info(f"epoch {rec['epoch']:3d}  {shown}  {rec['ms']:.0f} ms")
        return
    valid = (f"  valid loss {rec['valid_loss']:.4f} acc {rec['valid_accuracy']:.4f}" if "valid_loss" in rec else "")
    LOG.info(f"epoch {rec['epoch']:3d}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f}"
             f"{valid}  {rec['ms']:.0f} ms")
