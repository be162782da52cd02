"""The real `dvc repro` over the repository's dvc.yaml and params.yaml, on the built-in digits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def dvc(cwd: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def set_params(cwd: Path, **changes) -> None:
    params = yaml.safe_load((cwd / "params.yaml").read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = params
        for key in path:
            node = node[key]
        node[last] = value
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory, real_weights):
    if not (BIN / "dvc").exists():
        pytest.fail("dvc is not installed in this environment: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for code in ("export", "heads", "pipeline"):  # the stages depend on the code they run
        shutil.copytree(REPO / code, root / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    set_params(root, **{"model.image-size": 32})
    return root


def test_dvc_repro_runs_reruns_nothing_then_only_what_changed(project):
    out = dvc(project, "repro")
    for stage in ("data", "export", "extract", "train@digit", "train@parity", "train@properties", "evaluate@digit",
                  "evaluate@parity", "evaluate@properties"):
        assert f"Running stage '{stage}'" in out, out
    digit = json.loads((project / "metrics/digit/metrics.json").read_text())
    parity = json.loads((project / "metrics/parity/metrics.json").read_text())
    assert set(digit) == set(parity) == {"accuracy", "log_loss", "n"}  # short, for `dvc metrics show`
    assert digit["n"] == 360 and digit["accuracy"] > 0.8 and parity["accuracy"] > 0.8
    details = json.loads((project / "metrics/digit/details.json").read_text())
    assert len(details["per_class"]) == 10
    assert set(json.loads((project / "metrics/parity/details.json").read_text())["per_class"]) == {"even", "odd"}
    # the multi-label task beside them, on the same features: mean average precision over its three tags
    properties = json.loads((project / "metrics/properties/metrics.json").read_text())
    assert set(properties) == {"mAP", "micro_f1", "macro_f1", "n"} and properties["n"] == 360
    assert properties["mAP"] > 0.8, properties
    assert (project / "metrics/properties/confusion.png").stat().st_size > 10_000  # its precision-recall curves
    # Each task gets the options its head takes, no more: the auto heads carry no epochs, lr or l2.
    tasks = yaml.safe_load((project / "params.yaml").read_text())["tasks"]
    assert tasks["parity"].keys() == {"layer", "head", "classes-map"} and tasks["digit"]["head"] == "auto"

    assert "Running stage" not in dvc(project, "repro")

    set_params(project, **{"tasks.parity.calibration": "none"})
    out = dvc(project, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@parity", "evaluate@parity"}, out
    # the rest reruns the classes' tasks only: the multi-label one was checked above, and costs time
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["tasks"]["properties"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    (project / "heads" / "models.py").write_text((project / "heads" / "models.py").read_text() + "\n# edited\n")
    out = dvc(project, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert {"train@digit", "train@parity"} <= ran and not {"data", "export", "extract"} & ran, out

    set_params(project, **{"model.quantize": "int8", "model.calibrate-count": 8})
    out = dvc(project, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert {"export", "extract", "train@digit"} <= ran and " 0 reused" in out, out
    assert "int8 (calibrated on 8 photos of data/digits)" in out
    assert json.loads((project / "metrics/digit/metrics.json").read_text())["accuracy"] > 0.8

    set_params(project, **{"model.image-size": 64})  # after int8, whose extraction at 64 px is the faster
    out = dvc(project, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert {"export", "extract", "train@digit", "train@parity"} <= ran and "data" not in ran, out
    assert " 0 reused" in out  # a new model: the persisted cache was started afresh
    assert json.loads((project / "metrics/digit/metrics.json").read_text())["accuracy"] > 0.8

    metrics = json.loads(dvc(project, "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert "metrics/digit/metrics.json" in shown and "accuracy" in shown
    dvc(project, "plots", "show", "-o", "plots")
    assert (project / "plots" / "index.html").exists()

    # An experiment: a parameter changed from the command line, recorded beside the commit it started from.
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True, capture_output=True)
    out = dvc(project, "exp", "run", "-S", "tasks.parity.calibration=temperature")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@parity", "evaluate@parity"}, out
    shown = json.dumps(json.loads(dvc(project, "exp", "show", "--json")))
    assert '"calibration": "temperature"' in shown and '"accuracy"' in shown
