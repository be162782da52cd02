"""The package's structure: one import name, layers that import only downward, VGG16 written once as data."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from headstart.export import vgg

# The folders in their order, bottom first: a module may import its own layer or the ones below it.
LAYERS = ("export", "heads", "pipeline")
ROOT = REPO / "pipeline" / "_root"  # the root package `headstart` (pyproject's package-dir): above every layer


def modules() -> dict[str, Path]:
    def name(folder: str, p: Path) -> str:  # subpackages too: pipeline/commands/heads.py is ...commands.heads
        parts = [folder, *p.relative_to(REPO / folder).with_suffix("").parts]
        return "headstart." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    layered = {name(folder, p): p for folder in LAYERS for p in sorted((REPO / folder).rglob("*.py"))
               if ROOT not in p.parents and ".venv" not in p.parts}
    root = {"headstart" + ("" if p.stem == "__init__" else f".{p.stem}"): p for p in sorted(ROOT.glob("*.py"))}
    return layered | root


def rank(name: str) -> int:
    """A module's layer, bottom first; the root package's modules rank above all three."""
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def imports(name: str, path: Path) -> set[str]:
    """Every headstart module `name` imports, at the top or inside functions, relative imports resolved."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    known = modules()
    return {m for m in out if m in known and m != name}


def test_layers_import_only_downward_and_without_cycles():
    graph = {name: imports(name, path) for name, path in modules().items()}
    assert len(graph) > 15 and {"headstart.pipeline.cli", "headstart", "headstart.__main__"} <= set(graph)
    upward = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if rank(b) > rank(a)]
    assert not upward, f"upward imports: {upward}"
    # A module importing its own package's __init__ is not a cycle between modules: leave those edges out.
    cycle = find_cycle({a: {b for b in deps if b != ".".join(a.split(".")[:2])} for a, deps in graph.items()})
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A path that comes back to its start, or None (depth-first search)."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    return next((c for n in sorted(edges) if n not in state and (c := visit(n, [n]))), None)


def test_the_root_package_is_the_top_layer_and_nothing_imports_it():
    graph = {name: imports(name, path) for name, path in modules().items()}
    assert rank("headstart") == rank("headstart.__main__") == len(LAYERS) > rank("headstart.pipeline.cli")
    assert graph["headstart.__main__"] == {"headstart.pipeline.cli"}
    importers = [a for a, deps in graph.items() if a != "headstart.__main__" and deps & {"headstart",
                                                                                        "headstart.__main__"}]
    assert not importers, f"modules importing the root package: {importers}"


def test_the_walker_sees_an_import_of_the_root_package(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("import headstart\nfrom headstart import SoftmaxHead\n")
    assert imports("headstart.pipeline.train", path) == {"headstart"}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_walker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "extract.py"
    path.write_text("def f():\n    from ..heads.models import KINDS\n    from . import cache\n")
    assert imports("headstart.pipeline.extract", path) == {"headstart.heads.models", "headstart.pipeline.cache",
                                                            "headstart.pipeline"}


def test_installed_package_has_one_import_name(tmp_path):
    code = ("import importlib.util, headstart, headstart.heads, headstart.pipeline.cli, headstart.export; "
            "print([m for m in ('export', 'heads', 'pipeline', '_root') if importlib.util.find_spec(m)], "
            "headstart.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    found, root = done.stdout.split(" ", 1)
    assert found == "[]"
    assert Path(root.strip()).parent.name in ("_root", "headstart")  # editable: pipeline/_root; a wheel: headstart/
    assert not (REPO / "headstart").exists()  # nothing in the checkout can shadow the installed name


def test_a_built_wheel_holds_the_root_package_and_runs_from_it(tmp_path):
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: building writes build/ and egg-info beside the sources
    for name in ("export", "heads", "pipeline"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "build_backend.py"):
        shutil.copy(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("headstart-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"headstart/__init__.py", "headstart/__main__.py", "headstart/pipeline/cli.py",
            "headstart/heads/models.py", "headstart/export/vgg.py"} <= set(names)
    assert not [n for n in names if "_root" in n]  # the folder's name stays in the checkout
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure wheel: unpacked is installed, for an import
    code = ("import headstart, headstart.pipeline.cli as cli, importlib.metadata as m; "
            "print(headstart.__file__, cli.__file__, headstart.__version__ == m.version('headstart'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    root, cli, same = done.stdout.split()
    assert Path(root) == site / "headstart" / "__init__.py" and Path(cli) == site / "headstart" / "pipeline" / "cli.py"
    assert same == "True"


def test_vgg16_is_written_once_as_data():
    # torchvision's vgg16().features: a conv at these positions, ReLUs and pools between.
    assert [s.index for s in vgg.CONVS] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert [s.name for s in vgg.STAGES if s.kind == "pool"] == [f"pool{i}" for i in range(1, 6)]
    assert vgg.layer_shape("conv5_3", 224) == (512, 14, 14) and vgg.layer_shape("pool5", 224) == (512, 7, 7)
    assert vgg.layer_shape("gap", 64) == (512,) and vgg.layer_shape("fc7", 224) == (4096,)
    assert vgg.fc_input() == 25088
    assert vgg.body_gflop(224) == pytest.approx(30.69, abs=0.01)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        vgg.check_image_size(100)


def test_the_graph_follows_the_data(tmp_path):
    from headstart.export import build_body
    from headstart.export.weights import random_weights

    model = build_body(random_weights(0), 64, ("conv5_3", "gap"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [n.input[1].removesuffix(".w") for n in convs] == [s.name for s in vgg.CONVS]
    shapes = [[d.dim_value for d in o.type.tensor_type.shape.dim[1:]] for o in model.graph.output]
    assert shapes == [list(vgg.layer_shape("conv5_3", 64)), list(vgg.layer_shape("gap", 64))]
    assert np.prod(shapes[0]) == 512 * 4 * 4


def test_pool4_is_an_output_and_is_cached_like_any_layer(tmp_path):
    from helpers import generated_images

    from headstart.export import build_body, open_session, save
    from headstart.export.weights import random_weights
    from headstart.pipeline.cache import FeatureCache
    from headstart.pipeline.extract import extract

    model = save(build_body(random_weights(0), 64, ("pool4", "gap")), tmp_path / "m.onnx")
    generated_images(tmp_path / "d", 2)
    extract(tmp_path / "d", model, tmp_path / "c.zarr", dtype="float32", progress=False)
    fc = FeatureCache(tmp_path / "c.zarr")
    pool4 = fc.features("pool4")
    assert fc.layers == ["pool4", "gap"] and pool4.shape == (4, 512 * 4 * 4)
    from helpers import pixels

    want = open_session(model, quiet=True).run(["pool4"], {"images": pixels(fc.paths, 64)})[0]
    np.testing.assert_allclose(pool4, want.reshape(4, -1), rtol=1e-6)
