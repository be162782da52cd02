"""The CLI's vocabulary: every option used by more than one command is defined here once, with its one type and
its one help text; a command chooses only its default. tests/test_cli.py holds every command to this.

Choices and defaults come from the modules that own them, read lazily: `headstart --help` imports none of
onnx, onnxruntime, scikit-learn, numba or zarr.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from headstart.export.vgg import LAYERS


class Where(click.ParamType):
    """A local path or an fsspec URL (s3://bucket/key, memory://, file://), kept as text: a Path would fold
    the '//' of a URL."""

    name = "path|url"

    def convert(self, value, param, ctx):
        return str(value)


class LazyChoice(click.Choice):
    """A choice whose values are read from their module when first needed (parsing or help), not at import."""

    def __init__(self, get: Callable[[], Any]) -> None:
        self._get, self._choices, self.case_sensitive = get, None, True

    @property
    def choices(self) -> tuple:  # noqa: D102
        if self._choices is None:
            self._choices = tuple(self._get())
        return self._choices

    @choices.setter
    def choices(self, value: tuple) -> None:
        self._choices = tuple(value)


UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str = "size") -> int:
    """'256MB', '4GB', '512MiB', '20kB' -> bytes (units of 1000 or 1024 as written); a bare number is refused."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]+)\s*", str(text).lower())
    value = int(float(m.group(1)) * UNITS[m.group(2)]) if m and m.group(2) in UNITS else 0
    if value < 1:
        raise click.UsageError(f"{option} {text!r}: expected a size with its unit, such as 256MB, 4GB or 512MiB")
    return value


def format_size(n: int) -> str:
    """Bytes as a user writes them: 268435456 -> '256MiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


class Size(click.ParamType):
    """A size with its unit, such as 256MB, 4GB or 512MiB, as bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        return parse_size(value, param.opts[-1] if param else "size")


class Grid(click.ParamType):
    """Comma-separated values of one option's type, for `sweep`: the values to try."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = f"{inner.name},..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        return [self.inner.convert(v.strip(), param, ctx) for v in str(value).split(",") if v.strip()]


class Option(click.Option):
    """click's Option with a default read lazily (`lazy_default`) and a default written as a user writes it
    (`shown`, a text or a function returning one)."""

    def __init__(self, *args: Any, lazy_default: Callable[[], Any] | None = None,
                 shown: str | Callable[[], str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_default, self.shown = lazy_default, shown

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        if self.lazy_default is not None:
            return self.lazy_default()
        return super().get_default(ctx, call)

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if self.shown is not None:
            extra["default"] = self.shown() if callable(self.shown) else self.shown
        elif self.lazy_default is not None and self.show_default:
            value = self.lazy_default()
            if value is not None:
                extra["default"] = format_size(value) if isinstance(self.type, Size) else str(value)
        return extra


def default_of(module: str, function: str, name: str) -> Callable[[], Any]:
    """A function's own default for one of its parameters, read when needed: the CLI keeps no second copy."""
    return lambda: inspect.signature(getattr(importlib.import_module(module), function)).parameters[name].default


def _value(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def per_kind(param: str) -> Callable[[], str]:
    """Each head kind's own default for `param`, as users write it: '20 (softmax, mlp)' or
    '0.0001 (softmax, mlp), 0.01 (logistic)'."""

    def text() -> str:
        from headstart.heads.kinds import KINDS

        kinds: dict[str, list[str]] = {}
        for k, cls in KINDS.items():
            if param in inspect.signature(cls).parameters:
                kinds.setdefault(_value(inspect.signature(cls).parameters[param].default), []).append(k)
        if len(kinds) == 1 and len(next(iter(kinds.values()))) == len(KINDS):
            return next(iter(kinds))
        return ", ".join(f"{v} ({', '.join(ks)})" for v, ks in kinds.items())

    return text


def _kinds() -> list[str]:
    from headstart.heads.kinds import KINDS, TASK_KINDS

    return list(dict.fromkeys([*KINDS, *(k for reg in TASK_KINDS.values() for k in reg)]))


def _body_dtypes() -> tuple[str, ...]:
    from headstart.export.graph import DTYPES

    return DTYPES


def _devices() -> tuple[str, ...]:
    from headstart.export.runtime import DEVICES

    return DEVICES


POSITIVE = click.IntRange(min=1)
FRACTION = click.FloatRange(0, 1, max_open=True)
WHERE = Where()
SIZE = Size()
FILE = click.Path(dir_okay=False, path_type=Path)

# name -> (declarations, the fixed part: type, help, metavar, hidden ...). A command adds only default/required.
SHARED: dict[str, tuple[tuple[str, ...], dict]] = {
    "cache": (("--cache",), {"type": WHERE, "help": "The feature cache: a folder, or a URL such as "
                                                     "s3://bucket/f.zarr."}),
    "dataset": (("--dataset",), {"help": "The dataset inside the cache (a cache can hold several)."}),
    "body": (("--body",), {"type": FILE, "help": "The ONNX body written by `headstart export`."}),
    "onnx": (("--onnx", "onnx_model"), {"type": click.Path(exists=True, dir_okay=False, path_type=Path),
                                        "help": "Your own ONNX image model, not made by headstart: export wraps it "
                                                "as the body, bench body times it bare beside its --body."}),
    "classifier": (("--classifier",), {"type": FILE, "help": "A bundled ONNX classifier from `headstart bundle`."}),
    "head": (("--head", "kind"), {"type": LazyChoice(_kinds), "help": "The head kind."}),
    "head_file": (("--head-file", "head_path"), {"type": FILE, "help": "A trained head file (.head), from "
                                                  "`headstart train`, `tune` or `sweep --save-best`."}),
    "json": (("--json", "json_out"), {"type": click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                                      "metavar": "FILE|-", "help": "Write the result as JSON to FILE; '-' prints "
                                                                   "it to stdout instead of the text."}),
    "dtype": (("--dtype",), {"type": LazyChoice(_body_dtypes),
                             "help": "The body's compute type: float16 halves the model, for GPUs."}),
    "batch_size": (("--batch-size",), {"type": POSITIVE, "help": "Images per forward pass of the body."}),
    "minibatch": (("--minibatch",), {"type": POSITIVE, "help": "Rows per optimizer (Adam) step of a head."}),
    "jobs": (("--jobs",), {"type": POSITIVE, "help": "Image decoding workers."}),
    "layer": (("--layer",), {"help": f"One cached layer: VGG16's {', '.join(LAYERS)}, or those of a body from "
                                     "`export --onnx`."}),
    "layers": (("--layers",), {"help": f"Comma-separated layers: VGG16's {', '.join(LAYERS)}, or those of a body "
                                       "from `export --onnx`."}),
    "epochs": (("--epochs",), {"type": POSITIVE, "help": "Passes over the training rows."}),
    "lr": (("--lr",), {"type": float, "help": "Adam learning rate of the head."}),
    "l2": (("--l2",), {"type": float, "help": "L2 penalty on the mean loss."}),
    "hidden": (("--hidden",), {"help": "Comma-separated hidden layer sizes of an mlp head, such as 256 or 512,128."}),
    "memory": (("--memory",), {"type": SIZE, "help": "Memory budget, such as 4GB or 512MiB: of train's features "
                                                  "(softmax and mlp heads stream larger caches in blocks), of "
                                                  "audit's similarity blocks."}),
    "seed": (("--seed",), {"type": int, "help": "Seed of every random choice: a rerun gives the same result."}),
    "classes_map": (("--classes-map",), {"help": "YAML/JSON file: cache class name -> task label, or null to leave "
                                                 "a class out ('' for none)."}),
    "task": (("--task",), {"help": "Name of the task (default: the dataset's name)."}),
    "tags": (("--tags", "tags_column"), {"metavar": "COLUMN", "help": "A multi-label task: each image's tags, "
                                         "from this column of the manifest (`cat|outdoor`)."}),
    "tags_map": (("--tags-map",), {"type": click.Path(exists=True, dir_okay=False, path_type=Path),
                                   "help": "A multi-label task: YAML file, cache class name -> its tags."}),
    "target": (("--target",), {"metavar": "COLUMN", "help": "A regression task: each image's number, from this "
                                                           "column of the manifest."}),
    "manifest": (("--manifest",), {"type": WHERE, "help": "The CSV manifest holding a tags or value task's column "
                                                         "(default: train, the one the dataset was extracted from; "
                                                         "evaluate, the one the head was trained on)."}),
    "history": (("--history",), {"type": FILE, "help": "Write the per-epoch log as JSON."}),
    "augmented": (("--augmented",), {"is_flag": True, "help": "Each epoch, train on one of each image's cached views "
                                                              "(from `extract --augment K`)."}),
    "drop_duplicates": (("--drop-duplicates",), {"is_flag": True, "help": "Leave out images whose bytes are also in "
                                                                          "another split, or under another label."}),
    "output": (("-o", "--output"), {"type": FILE, "help": "The file to write."}),
    "train_split": (("--train-split",), {"help": "The split to train on."}),
    "valid_split": (("--valid-split",), {"help": "The split to validate on."}),
    "exclude": (("--exclude",), {"type": click.Path(exists=True, dir_okay=False, path_type=Path),
                                 "help": "A file of rows to leave out of training and scoring: one path (as the "
                                         "cache stores it, or its end, such as train/cats/cat.1.jpg) or sha256 "
                                         "content hash a line; blank lines and '#' comments are ignored. A head "
                                         "records them: evaluate leaves out the same rows unless given its own."}),
    "relabel": (("--relabel",), {"type": click.Path(exists=True, dir_okay=False, path_type=Path),
                                 "help": "A CSV of path,label rows (a header optional): train and score these "
                                         "images under these labels, without touching the photos or the cache. A "
                                         "head records them: evaluate scores under the same labels unless given "
                                         "its own."}),
    "valid_fraction": (("--valid-fraction",), {"type": FRACTION, "help": "Share of the images held out as the valid "
                                                                         "split, where there is none."}),
    "image_size": (("--image-size",), {"type": int, "help": "Input side in pixels, a multiple of 32."}),
    "calibrate": (("--calibrate",), {"type": click.Path(exists=True, path_type=Path),
                                     "help": "Photos (a folder or CSV manifest) that calibrate the int8 body."}),
    "calibrate_count": (("--calibrate-count",), {"type": POSITIVE, "help": "How many calibration photos (int8), "
                                                                           "spread evenly over them."}),
    "plot": (("--plot",), {"type": FILE, "help": "Write the plot (PNG) here."}),
    "dask": (("--dask", "dask_address"), {"help": "Run on a Dask cluster: local:N (a LocalCluster of N worker "
                                                  "processes) or a scheduler's address (tcp://HOST:PORT)."}),
    "device": (("--device",), {"type": LazyChoice(_devices), "help": "Where onnxruntime runs: CUDA when usable, "
                                                                     "else the CPU."}),
}


def shared(name: str, grid: bool = False, **per_command: Any) -> Callable:
    """The one definition of a shared option, with this command's default (`default`, `lazy_default`, `shown`,
    `show_default`, `required`); `grid`: comma-separated values of its type, for sweep."""
    allowed = {"default", "lazy_default", "shown", "show_default", "required"}
    if set(per_command) - allowed:
        raise TypeError(f"{name}: a command may set only {sorted(allowed)}, not {sorted(set(per_command) - allowed)}")
    decls, fixed = SHARED[name]
    fixed = dict(fixed)
    if grid:
        fixed["type"] = Grid(click.types.convert_type(fixed.get("type")))
    if "default" in per_command or "lazy_default" in per_command:
        per_command.setdefault("show_default", True)
    return click.option(*decls, cls=Option, **fixed, **per_command)


SELECTION = ("dataset", "train_split", "valid_split", "valid_fraction", "seed", "classes_map", "drop_duplicates",
             "augmented", "exclude", "relabel")


def _selection_default(name: str) -> Callable[[], Any]:
    def read() -> Any:
        from headstart.pipeline.selection import default

        return default(name)

    return read


def selection_options(*names: str, dataset: str = "the only one") -> Callable:
    """The shared options of a task selection (`names`, of SELECTION; all by default), their defaults read from
    pipeline.selection.Selection; the command receives one `selection` argument instead of them."""
    names = names or SELECTION
    flags = {"drop_duplicates", "augmented"}

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            kwargs["selection"] = build_selection({n: kwargs.pop(n) for n in names})
            return fn(*args, **kwargs)

        for name in reversed(names):
            if name == "dataset":
                run = shared(name, shown=dataset)(run)
            elif name in ("exclude", "relabel") or name in flags:
                run = shared(name)(run)
            else:
                run = shared(name, lazy_default=_selection_default(name))(run)
        return run

    return decorate


def build_selection(given: dict[str, Any], base: Any = None) -> Any:
    """A Selection from option values (files read here), over `base` (a Selection) when given."""
    import dataclasses

    from headstart.pipeline.selection import Selection, read_classes_map, read_exclude, read_relabel

    given = dict(given)
    origin = dict(base.origin) if base is not None else {}
    if "classes_map" in given:
        given["classes_map"] = read_classes_map(given["classes_map"] or None)
    for name, read in (("exclude", read_exclude), ("relabel", read_relabel)):
        if given.get(name) is None:
            given.pop(name, None)
        else:
            given[name], where = read(given[name])
            origin.update(where)
    return dataclasses.replace(base or Selection(), **given, origin=origin)
