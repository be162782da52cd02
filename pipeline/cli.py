"""The `headstart` command line: the group, its error reporting and its logging; the commands live in
pipeline/commands/, thin over the export, heads and pipeline packages.

Shared options come from pipeline/options.py, their one definition; choices and defaults come from the modules
that own them, read lazily, so `headstart --help` and `headstart info` start without the heavy libraries.
"""

from __future__ import annotations

import errno
import logging
import sys

import click

from headstart.export.progress import LOG

from .commands import audit, bench, data, features, heads, model
from .commands.common import Failure

BUG = "this is a bug in headstart: please report it, with the traceback above, at {where}"
PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota is the machine's state, not a bug


def issues_url() -> str:
    """Where bugs go: the package's Issues (or Bug Tracker) project URL."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("headstart").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("issues", "bug tracker", "tracker"):
            return url.strip()
    return "the project's issue tracker"


def _object_store_line(e: BaseException) -> str | None:
    """An object store client's own error as one line; its module is imported only where one was raised."""
    if type(e).__module__.split(".")[0] not in ("botocore", "aiobotocore", "s3fs", "gcsfs", "google"):
        return None
    from .storage import store_error

    return store_error(e)


class Headstart(click.Group):
    """The group that reports errors: what a user caused (a HeadstartError, a path they gave that is missing or
    unreadable, a full disk, an object store's refusal) as one line and exit status 1; anything else is a bug in
    headstart, raised on with its traceback and a line saying where to report it."""

    def invoke(self, ctx: click.Context) -> object:
        from headstart.export.errors import HeadstartError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except HeadstartError as e:
            raise Failure(str(e).strip() or type(e).__name__) from None
        except PATH_ERRORS as e:
            if e.filename is None:
                _mark_bug(e)
                raise
            raise Failure(f"{e.filename}: {e.strerror or type(e).__name__}") from None
        except OSError as e:
            if e.errno not in FULL:
                _mark_bug(e)
                raise
            raise Failure(f"{e.filename + ': ' if e.filename else ''}{e.strerror}; free some space and rerun") \
                from None
        except Exception as e:
            line = _object_store_line(e)
            if line is not None:
                raise Failure(line) from None
            _mark_bug(e)
            raise


def _mark_bug(e: BaseException) -> None:
    """Python prints an exception's notes under its traceback: the bug line comes last, where a user looks."""
    line = BUG.format(where=issues_url())
    if not hasattr(e, "add_note"):  # Python 3.10: no notes; the line comes before the traceback instead
        click.echo(line, err=True)
    elif line not in getattr(e, "__notes__", []):
        e.add_note(line)


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


@click.group(cls=Headstart, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headstart")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no progress bars, no status lines.")
@click.option("-v", "--verbose", is_flag=True, help="Also debug lines.")
def main(quiet: bool, verbose: bool) -> None:
    """Headstart: run the frozen ImageNet body once, cache its activations, train heads in seconds."""
    if quiet and verbose:
        raise click.UsageError("-q and -v contradict each other: give one")
    _logging(quiet, verbose)


for command in (model.export, model.info, features.extract, features.verify, heads.train, heads.tune, heads.sweep,
                heads.evaluate, model.bundle, features.predict, audit.audit, data.data, data.doctor, bench.bench):
    main.add_command(command)


if __name__ == "__main__":
    sys.exit(main())
