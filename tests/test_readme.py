"""The README's CLI reference is the real --help of every command. `python tests/test_readme.py` rewrites it."""

import re
import sys

import click
from click.testing import CliRunner
from conftest import REPO

from headstart.pipeline.cli import main

BEGIN, END = "<!-- cli-reference: begin -->", "<!-- cli-reference: end -->"


def commands(group: click.Group, prefix: list[str]) -> list[list[str]]:
    out = [prefix]
    for name in sorted(group.commands):
        cmd = group.commands[name]
        out += commands(cmd, [*prefix, name]) if isinstance(cmd, click.Group) else [[*prefix, name]]
    return out


def reference() -> str:
    parts = []
    for path in commands(main, []):
        text = CliRunner().invoke(main, [*path, "--help"], prog_name="headstart", terminal_width=100).output
        parts.append(f"### `{' '.join(['headstart', *path])}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def test_readme_cli_reference_matches_help():
    readme = (REPO / "README.md").read_text()
    block = re.search(re.escape(BEGIN) + r"\n(.*)" + re.escape(END), readme, re.S)
    assert block, "README.md lacks the cli-reference markers"
    stale = "README's CLI reference is stale: run python tests/test_readme.py"
    assert block.group(1).strip() == reference().strip(), stale


if __name__ == "__main__":
    path = REPO / "README.md"
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + reference() + "\n" + text[end:])
    sys.exit(0)
