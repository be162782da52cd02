"""The CLI reference in docs/cli.md, generated from the commands' own --help.

`python -m headstart.pipeline.clidoc [docs/cli.md]` rewrites the part between the markers; `--check` only says
whether it is stale (exit status 1). tests/test_cli.py fails when it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner

BEGIN, END = "<!-- cli-reference: begin -->", "<!-- cli-reference: end -->"
WIDTH = 100


def commands(group: click.Group, prefix: list[str] | None = None) -> list[list[str]]:
    """Every command path under `group`, groups included, in sorted order: [[], ['bench'], ['bench', 'body'], ...]."""
    prefix = prefix or []
    out = [prefix]
    for name in sorted(group.commands):
        cmd = group.commands[name]
        out += commands(cmd, [*prefix, name]) if isinstance(cmd, click.Group) else [[*prefix, name]]
    return out


def reference() -> str:
    """Each command's --help as Markdown sections."""
    from .cli import main

    parts = []
    for path in commands(main):
        text = CliRunner().invoke(main, [*path, "--help"], prog_name="headstart", terminal_width=WIDTH).output
        parts.append(f"### `{' '.join(['headstart', *path])}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def rewrite(text: str) -> str:
    """`text` with the reference between the markers replaced by the current one."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} markers")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + reference() + "\n" + text[end:]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    path = Path(next((a for a in argv if a != "--check"), "docs/cli.md"))
    text = path.read_text()
    new = rewrite(text)
    if check:
        if new != text:
            print(f"{path} is stale: run python -m headstart.pipeline.clidoc {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
