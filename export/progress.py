"""Status lines and progress bars for every layer: the `headstart` logger and one progress-bar factory.

The CLI sets the logger's level (`-q`: warnings only, `-v`: debug); a library user configures `logging` as
usual. Bars follow the same switch: an explicit level above INFO on the `headstart` logger turns them off.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

LOG = logging.getLogger("headstart")
LINE_SECONDS = 5.0  # a plain progress line at most this often when stderr is a file or a pipe


def quiet() -> bool:
    """True when the `headstart` logger was set above INFO (the CLI's -q): no bars, no status lines."""
    return LOG.level > logging.INFO


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and hasattr(shell, "kernel")


class _Lines:
    """A file for tqdm that turns its carriage-return frames into whole lines: logs get no '\\r' frames."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"


def bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar (tqdm.auto: a widget in notebooks) on a terminal; elsewhere a plain line every few seconds.

    Takes tqdm's arguments; off when `disable` or when the `headstart` logger is quieter than INFO.
    """
    from tqdm.auto import tqdm
    from tqdm.std import tqdm as plain

    disable = disable or quiet()
    stream = sys.stderr
    if disable or _in_notebook() or (hasattr(stream, "isatty") and stream.isatty()):
        return tqdm(iterable, disable=disable, **kwargs)
    kwargs.setdefault("mininterval", LINE_SECONDS)
    kwargs.pop("leave", None)  # a line once written stays
    return plain(iterable, file=_Lines(stream), ncols=100, dynamic_ncols=False, ascii=True, **kwargs)
