"""The flat Python API: `import headstart as hs`, lazily; one call per step; the README's notebook version runs."""

from __future__ import annotations

import csv
import importlib.metadata
import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REPO, generated_images

import headstart as hs
from headstart.pipeline.cli import main

# The README's Python section, exactly as README.md shows it (the docs' test reads it from there). Here the
# export takes random weights: the same lines, no download.


def readme_python() -> str:
    """The README's one Python block, as a user copies it."""
    text = (REPO / "README.md").read_text()
    part = text[text.index("\n## Python\n"):]
    part = part[:part.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", part, re.S)
    assert len(blocks) == 1, "the README's Python section holds one block"
    return blocks[0]


HEAVY = ("onnx", "onnxruntime", "zarr", "sklearn", "numba")


def run_python(code: str, cwd=None) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# The package -------------------------------------------------------------------------------------------------

def test_import_headstart_loads_none_of_the_heavy_libraries_until_a_name_is_used(tmp_path):
    out = run_python(f"import sys, headstart as hs; print([m for m in {HEAVY} if m in sys.modules]); "
                     f"v = hs.__version__; print([m for m in {HEAVY} if m in sys.modules]); "
                     f"hs.LogisticHead; print([m for m in {HEAVY} if m in sys.modules])", cwd=tmp_path)
    before, after_version, after_head = out.splitlines()
    assert before == after_version == "[]"
    assert "'sklearn'" in after_head  # the name was really imported on first use


def test_importing_the_cli_loads_none_of_the_heavy_libraries(tmp_path):
    out = run_python(f"import sys, headstart.pipeline.cli; print([m for m in {HEAVY} if m in sys.modules])",
                     cwd=tmp_path)
    assert out == "[]"


def test_the_public_names_are_listed_and_resolve():
    from headstart import _NAMES

    assert set(hs.__all__) == {"__version__", *_NAMES}
    assert hs.__version__ == importlib.metadata.version("headstart")
    for name in _NAMES:
        obj = getattr(hs, name)
        assert obj.__name__ == name and obj.__module__ == _NAMES[name], name
    assert set(hs.__all__) | {"export", "heads", "pipeline"} <= set(dir(hs))
    assert hs.heads.save_head is hs.save_head and hs.pipeline.__name__ == "headstart.pipeline"
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        hs.nothing  # noqa: B018
    assert issubclass(hs.CacheError, ValueError) and issubclass(hs.HeadFileError, ValueError)


def test_python_m_headstart_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "headstart", "--help"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: headstart ") and "extract" in done.stdout


def sections(doc: str) -> set[str]:
    """The numpydoc section titles of a docstring (a title line underlined with dashes)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    return {a.strip() for a, b in zip(lines, lines[1:], strict=False) if b.strip() and set(b.strip()) == {"-"}}


def documented_parameters(doc: str) -> set[str]:
    """Names in a docstring's Parameters section ("a, b : type" lines and "**options")."""
    text = inspect.cleandoc(doc).split("Parameters\n----------\n", 1)[1]
    text = re.split(r"\n\S[^\n]*\n-{3,}\n", text, maxsplit=1)[0]
    names = set()
    for line in text.splitlines():
        if line and not line.startswith(" "):
            names |= {n.strip().lstrip("*") for n in line.split(" : ")[0].split(",")}
    return names


def test_every_public_name_has_a_numpy_docstring():
    errors = {name for name in hs.__all__ if name.endswith("Error")}
    assert all(issubclass(getattr(hs, name), hs.HeadstartError) for name in errors)
    for name in set(hs.__all__) - {"__version__"} - errors:
        obj = getattr(hs, name)
        found = sections(obj.__doc__)
        assert "Examples" in found, name
        if inspect.isclass(obj):
            assert found & {"Parameters", "Attributes"}, name
            init = obj.__init__ if "__init__" in vars(obj) else None
            wanted = set(inspect.signature(obj).parameters) if init or hasattr(obj, "__dataclass_fields__") else set()
            if "Parameters" in found:
                assert wanted <= documented_parameters(obj.__doc__), (name, wanted - documented_parameters(obj.__doc__))
        else:
            assert {"Parameters", "Returns"} <= found, name
            wanted = {p for p in inspect.signature(obj).parameters}
            assert wanted == documented_parameters(obj.__doc__), (name, wanted ^ documented_parameters(obj.__doc__))
    for name in errors:
        assert getattr(hs, name).__doc__, name
    assert {"Parameters", "Returns", "Examples"} <= sections(hs.FeatureCache.xy.__doc__)


def test_the_heads_examples_run():
    import doctest

    import headstart.heads.models

    result = doctest.testmod(headstart.heads.models)
    assert result.attempted >= 9 and result.failed == 0


def test_the_docstring_checker_reads_parameters():
    doc = """Summary.

    Parameters
    ----------
    a, b : int
        Two.
    **options
        More.

    Returns
    -------
    int
        Something.
    """
    assert sections(doc) == {"Parameters", "Returns"} and documented_parameters(doc) == {"a", "b", "options"}


# The notebook version ----------------------------------------------------------------------------------------

def digits_like(root, per_class=6) -> None:
    for split, seed in (("train", 0), ("valid", 1)):
        generated_images(root, per_class, split, classes=("0", "1", "2"), seed=seed, fmt="PNG")


def test_the_readme_python_section_runs(tmp_path, monkeypatch, capsys):
    export = 'hs.export_body("models/vgg16.onnx", image_size=64)'
    assert readme_python().count(export) == 1 and len([x for x in readme_python().splitlines() if x]) <= 8
    digits_like(tmp_path / "data" / "digits")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(readme_python().replace(export, export[:-1] + ", random_weights=0)"), ns)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and re.fullmatch(r"valid accuracy [01]\.\d{3}", printed[0]), printed
    assert ns["X"].shape == (18, 512) and ns["X"].dtype == np.float32 and sorted(set(ns["y"])) == ["0", "1", "2"]
    result = ns["result"]
    assert len(result) == 18 and (tmp_path / "predictions.csv").read_text().count("\n") == 19
    # The bundled classifier and the head agree on what the head saw: the body inside the file is the cache's.
    Xv, _ = ns["cache"].xy("gap", "valid")
    np.testing.assert_allclose(result.probabilities, ns["head"].predict_proba(Xv), atol=2e-3)


# One call per step -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    digits_like(root / "data", per_class=4)
    (root / "data" / "valid" / "1" / "broken.png").write_bytes(b"not a png")
    body = hs.export_body(root / "m.onnx", image_size=64, random_weights=0)  # pool5 (2,048) wider than gap
    cache = hs.extract(root / "data", body, root / "c.zarr", progress=False)
    return root, body, cache


def test_export_body_writes_the_body_and_refuses_int8_without_photos(project, tmp_path):
    root, body, _ = project
    from headstart.export import read_metadata

    meta = read_metadata(body)
    assert meta["kind"] == "body" and meta["image_size"] == "64" and meta["weights_source"] == "random:0"
    with pytest.raises(ValueError, match="needs calibrate="):
        hs.export_body(tmp_path / "q.onnx", random_weights=0, image_size=32, quantize="int8")
    assert not (tmp_path / "q.onnx").exists()


def test_extract_returns_the_dataset_with_its_report(project):
    root, _, cache = project
    assert isinstance(cache, hs.FeatureCache) and cache.dataset == "data" and len(cache) == 24
    assert (cache.report.files, cache.report.computed, cache.report.skipped) == (25, 25, 1)
    again = hs.extract(root / "data", root / "m.onnx", root / "c.zarr", progress=False)
    assert (again.report.reused, again.report.computed) == (25, 0) and len(again) == 24
    assert [s["path"].endswith("broken.png") for s in cache.skipped] == [True]


def test_xy_gives_float32_features_and_label_names_of_one_split(project, tmp_path):
    root, body, cache = project
    X, y = cache.xy("gap")
    train = cache.select("train")
    np.testing.assert_array_equal(X, cache.features("gap", train))
    assert X.dtype == np.float32 and y.dtype.kind == "U" and list(y) == [cache.classes[i] for i in cache.labels[train]]
    Xv, yv = cache.xy("pool5", "valid")
    assert Xv.shape == (12, cache.root["features/pool5"].shape[1]) and sorted(set(yv)) == ["0", "1", "2"]
    assert len(cache.xy("gap", None)[1]) == len(X) + len(Xv)
    with pytest.raises(hs.CacheError, match=r"no labelled images in split 'test' \(splits: train, valid\)"):
        cache.xy("gap", "test")
    with pytest.raises(hs.CacheError, match="no layer 'fc7'; it holds gap, pool5"):
        cache.xy("fc7")
    generated_images(tmp_path / "more", 2, classes=("x", "y"))
    hs.extract(tmp_path / "more", body, cache.path, progress=False)
    X2, y2 = hs.FeatureCache(cache.path, "data").xy("gap", None, dataset="more")
    assert X2.shape == (4, 512) and sorted(y2) == ["x", "x", "y", "y"]


def test_bundle_needs_to_know_the_features_of_a_head_fitted_on_arrays(project, tmp_path):
    root, body, cache = project
    head = hs.LogisticHead().fit(*cache.xy("gap"))
    with pytest.raises(ValueError, match="does not say which body features .* pass hs.bundle the cache= and layer="):
        hs.bundle(body, head, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="reads 512 features, and layer 'pool5'"):
        hs.bundle(body, head, tmp_path / "x.onnx", cache=cache, layer="pool5")
    with pytest.raises(ValueError, match="pass both"):
        hs.bundle(body, head, tmp_path / "x.onnx", cache=cache)
    out = hs.bundle(body, head, tmp_path / "x.onnx", cache=cache, layer="gap")
    assert out == tmp_path / "x.onnx" and head.meta_["layer"] == "gap"
    other = hs.export_body(tmp_path / "other.onnx", image_size=64, random_weights=1)
    with pytest.raises(hs.IncompatibleError, match="weights_sha256"):
        hs.bundle(other, head, tmp_path / "y.onnx", cache=cache, layer="gap")


def test_a_trained_head_file_bundles_and_predicts_as_the_cli_does(project, tmp_path):
    root, body, cache = project
    head = hs.train_head(cache, "gap", "logistic")  # an open cache view is taken as is
    assert head.meta_["task"] == "data" and head.meta_["rows"] == {"train": 12, "valid": 12}
    path = hs.save_head(head, tmp_path / "h.head")
    with pytest.raises(ValueError, match="not 'pool5'"):
        hs.bundle(body, path, tmp_path / "c.onnx", cache=cache, layer="pool5")
    classifier = hs.bundle(body, path, tmp_path / "c.onnx")
    result = hs.predict(classifier, root / "data", output=tmp_path / "api.csv")
    assert isinstance(result, hs.Predictions) and len(result) == 24 and result.classes == ["0", "1", "2"]
    assert result.probabilities.shape == (24, 3) and result.probabilities.dtype == np.float32
    np.testing.assert_allclose(result.probabilities.sum(1), 1, atol=1e-5)
    assert list(result.labels) == [result.classes[i] for i in result.probabilities.argmax(1)]
    assert [s["path"] for s in result.skipped] == [str(root / "data" / "valid" / "1" / "broken.png")]
    cli = CliRunner().invoke(main, ["predict", str(root / "data"), "--classifier", str(classifier), "-o",
                                    str(tmp_path / "cli.csv")])
    assert cli.exit_code == 0, cli.output
    assert (tmp_path / "api.csv").read_text() == (tmp_path / "cli.csv").read_text()
    with open(tmp_path / "cli.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["error"]]
    assert [r["path"] for r in rows] == list(result.paths)
    np.testing.assert_allclose([[float(r[c]) for c in result.classes] for r in rows], result.probabilities,
                               atol=1e-6)
    assert list(cache.paths) == list(result.paths)  # the same scan order: the head saw these rows
    np.testing.assert_allclose(result.probabilities, head.predict_proba(cache.features("gap")), atol=2e-3)
    clipped = hs.predict(classifier, root / "data", clip=(0.1, 0.9))
    assert clipped.probabilities.min() >= 0.1 - 1e-7 and clipped.probabilities.max() <= 0.9 + 1e-7
    assert list(clipped.labels) == list(result.labels)
