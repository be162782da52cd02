"""The README and docs/ say what is true: links resolve, commands use the CLI's own option names, and the README's
quickstart and Python run as written."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import REPO, generated_images

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SETUP = ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dvc]" && dvc repro', "bash .ci/run")
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced blocks and inline code, where brackets and hashes are not Markdown."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def section(text: str, heading: str) -> str:
    """From `heading` (a whole line) to the next heading of the same or a higher level."""
    start = re.search(rf"^{re.escape(heading)}$", text, re.M)
    assert start, f"no {heading!r} heading"
    level = len(heading) - len(heading.lstrip("#"))
    rest = text[start.end():]
    end = re.search(rf"^#{{1,{level}}} ", FENCE.sub(lambda m: " " * len(m.group(0)), rest), re.M)
    return rest[:end.start()] if end else rest


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, repeated headings numbered -1, -2 as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_githubs_rules():
    assert slug("Kaggle's dogs-vs-cats, from a raw folder to predictions.csv") == \
        "kaggles-dogs-vs-cats-from-a-raw-folder-to-predictionscsv"
    assert slug("The body: `float32` and int8") == "the-body-float32-and-int8"
    assert slug("Set up and run") == "set-up-and-run"
    assert slug("`headstart bench epochs`") == "headstart-bench-epochs"
    assert slug("A [link](x.md) in_it") == "a-link-in_it"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if REPO not in dest.parents and dest != REPO:
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_docs_index_lists_every_page():
    index = (REPO / "docs" / "index.md").read_text()
    listed = {t.partition("#")[0] for t in LINK.findall(prose(index))}
    pages = {p.name for p in PAGES if p.parent == REPO / "docs" and p.name != "index.md"}
    assert pages <= listed, f"docs/index.md does not list {sorted(pages - listed)}"


def test_readme_is_short_and_names_the_two_setup_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines; move detail to docs/"
    setup = "\n".join(code_blocks(section(text, "## Install and run"), "bash"))
    for command in SETUP:
        assert command in setup, f"README's set-up block lacks {command!r}"


def shell_commands(text: str) -> list[list[str]]:
    """Every `headstart ...` command of the bash blocks, as words (continuations joined, comments dropped)."""
    out = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            parts: list[list[str]] = [[]]
            for w in words:
                if w in ("&&", "||", ";", "|"):
                    parts.append([])
                else:
                    parts[-1].append(w)
            out += [p for p in parts if p and p[0] == "headstart"]
    return out


def unknown_options(words: list[str]) -> list[str]:
    """The options of one command line that its click command does not define."""
    from headstart.pipeline.cli import main

    def names(cmd: click.Command) -> set[str]:
        return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}

    cmd, i, bad = main, 1, []
    while True:
        while i < len(words) and words[i].startswith("-"):
            if words[i].split("=")[0] not in names(cmd):
                bad.append(words[i])
            i += 1
        if not isinstance(cmd, click.Group):
            break
        if i == len(words) or words[i] not in cmd.commands:
            return [f"no command {' '.join(words[:i + 1])!r}"]
        cmd, i = cmd.commands[words[i]], i + 1
    for w in words[i:]:
        if w.startswith("-") and w != "-" and not re.match(r"-\d", w) and w.split("=")[0] not in names(cmd):
            bad.append(w)
    return bad


def test_documented_commands_use_the_clis_option_names():
    wrong = {}
    for page in PAGES:
        for words in shell_commands(page.read_text()):
            bad = unknown_options(words)
            if bad:
                wrong[f"{page.relative_to(REPO)}: {' '.join(words)}"] = bad
    assert not wrong, f"documented commands with options the CLI lacks: {wrong}"


def test_readme_quickstart_is_at_most_eight_commands():
    block = code_blocks(section(README.read_text(), "## Quickstart"), "bash")
    assert len(block) == 1
    lines = [line for line in block[0].splitlines() if line.split("#")[0].strip()]
    assert 1 <= len(lines) <= 8, lines


def digits_like(root: Path) -> None:
    """A small folder in data/digits' layout: hermetic stand-in for `headstart data digits`."""
    generated_images(root, 12, "train", classes=("0", "1", "2"))
    generated_images(root, 4, "valid", classes=("0", "1", "2"), seed=1)


# The README's Python block runs in tests/test_api.py (test_the_readme_python_section_runs).


def test_guide_python_runs_as_written(tmp_path, random_model, monkeypatch):
    import headstart as hs

    blocks = code_blocks(section((REPO / "docs" / "guide.md").read_text(), "## Python"), "python")
    assert len(blocks) == 1 and "hs.FeatureCache" in blocks[0]
    digits_like(tmp_path / "data" / "digits")
    monkeypatch.chdir(tmp_path)
    hs.extract("data/digits", random_model, "cache/features.zarr")
    (tmp_path / "models").mkdir()
    exec(compile(blocks[0], "docs/guide.md", "exec"), {})
    assert (tmp_path / "models" / "tuned.head").is_file()


@pytest.mark.slow
def test_readme_quickstart_runs_verbatim(tmp_path, real_weights):
    """The quickstart's commands, as written, in an empty folder: the real weights (downloaded once), 64 px."""
    block = code_blocks(section(README.read_text(), "## Quickstart"), "bash")[0]
    where = tmp_path / "cwd.txt"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{block}\npwd > {shlex.quote(str(where))}\n"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = Path(where.read_text().strip())
    valid = sorted((folder / "data" / "digits" / "valid").rglob("*.png"))
    assert len(valid) > 300
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(str(p.relative_to(folder)) for p in valid)
    assert not any(r["error"] for r in rows)
    right = sum(r["label"] == Path(r["path"]).parent.name for r in rows)
    assert right / len(rows) > 0.8, f"quickstart accuracy {right / len(rows):.3f}"
