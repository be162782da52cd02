"""Installs beyond Linux: dependencies that resolve for macOS and Windows, no fcntl, no shell in dvc.yaml."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml
from click.testing import CliRunner
from helpers import REPO

from headstart.export.errors import BusyError
from headstart.pipeline.cli import main
from headstart.pipeline.storage import open_folder

# Python's marker variables on each target (what packaging evaluates a dependency's marker against).
TARGETS = {
    "macosx_14_0_arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64",
                          "os_name": "posix"},
    "win_amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64",
                  "os_name": "nt"},
    "manylinux_2_28_x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                              "os_name": "posix"},
}
RUNTIME = {"macosx_14_0_arm64": "onnxruntime", "win_amd64": "onnxruntime-gpu", "manylinux_2_28_x86_64":
           "onnxruntime-gpu"}


# The writer's lock ------------------------------------------------------------------------------------------------

def test_a_second_writer_in_the_same_process_is_refused_until_the_first_releases(tmp_path):
    folder = open_folder(tmp_path / "c.zarr")
    first = folder.lock()
    with pytest.raises(BusyError, match=rf"^pid {os.getpid()} since \d{{4}}-"):
        folder.lock()
    first.release()
    first.release()  # twice is harmless
    again = folder.lock()
    again.release()
    assert not (tmp_path / "c.zarr.lock.holder").exists()  # the note goes with its holder


HOLD = """
import sys
from headstart.pipeline.storage import open_folder
lock = open_folder(sys.argv[1]).lock()
print("held", flush=True)
sys.stdin.read()
"""


def test_another_process_holding_the_lock_is_named_and_its_death_frees_the_lock(tmp_path):
    where = str(tmp_path / "c.zarr")
    child = subprocess.Popen([sys.executable, "-c", HOLD, where], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=rf"^pid {child.pid} since "):
            open_folder(where).lock()
    finally:
        child.send_signal(signal.SIGKILL)  # no release, no cleanup: the OS lock goes with the process
        child.wait()
    lock = open_folder(where).lock()  # the dead holder's note is left behind, and overwritten
    assert f"pid {os.getpid()} " in (tmp_path / "c.zarr.lock.holder").read_text()
    lock.release()


# No fcntl ---------------------------------------------------------------------------------------------------------

WITHOUT_FCNTL = """
import sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
import headstart.pipeline.storage, headstart.pipeline.cache
from headstart.pipeline.cli import main
main(["--help"], prog_name="headstart")
"""


def test_the_cli_starts_where_there_is_no_fcntl():
    done = subprocess.run([sys.executable, "-c", WITHOUT_FCNTL], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage: headstart" in done.stdout


def test_no_module_of_ours_imports_fcntl():
    found = []
    for folder in ("export", "heads", "pipeline"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                found += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "fcntl"]
    assert len(found) == 0, found


# No shell in dvc.yaml ---------------------------------------------------------------------------------------------

def commands(stages: dict) -> dict[str, str]:
    return {name: " ".join(str(stage.get("do", stage)["cmd"]).split()) for name, stage in stages.items()}


def plain_headstart(cmd: str) -> bool:
    """A headstart command and nothing a shell would interpret (dvc's own ${...} templating aside)."""
    bare = re.sub(r"\$\{[^}]*\}", "X", cmd)
    return bare.split()[0] == "headstart" and not re.search(r"[;&|<>`$*]|\brm\b", bare)


def test_dvc_stages_run_headstart_commands_only():
    cmds = commands(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert {"data", "export", "extract", "train", "evaluate"} <= set(cmds)
    assert [f"{name}: {cmd}" for name, cmd in cmds.items() if not plain_headstart(cmd)] == []


def test_the_checker_sees_shell_syntax():
    assert plain_headstart("headstart extract ${data.dir} --cache cache/features.zarr ${extract}")
    for cmd in ("rm -rf x && headstart data digits x", "headstart data digits x > log", "headstart a; rm b",
                "headstart data digits $(pwd)/x", "python -m headstart data digits x"):
        assert not plain_headstart(cmd), cmd


def test_data_digits_replaces_its_own_folder_and_nothing_else(tmp_path):
    out = tmp_path / "digits"
    first = CliRunner().invoke(main, ["data", "digits", str(out)])
    assert first.exit_code == 0, first.output
    (out / "train" / "0" / "stray.png").write_bytes(b"left from before")
    again = CliRunner().invoke(main, ["data", "digits", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert not (out / "train" / "0" / "stray.png").exists() and (out / "parity.yaml").is_file()
    assert sum(1 for _ in out.rglob("*.png")) == 1797
    photos = tmp_path / "photos"
    (photos / "train").mkdir(parents=True)
    (photos / "holiday.jpg").write_bytes(b"not ours")
    refused = CliRunner().invoke(main, ["data", "digits", str(photos), "--overwrite"])
    assert refused.exit_code != 0 and "holiday.jpg" in refused.output and "refusing to delete it" in refused.output
    assert (photos / "holiday.jpg").read_bytes() == b"not ours"


# Dependencies resolve for macOS and Windows -----------------------------------------------------------------------

def dependencies(env: dict[str, str]) -> list[str]:
    """The project's dependencies for a target, markers evaluated there, as marker-free requirements."""
    import tomllib
    from packaging.requirements import Requirement

    out = []
    for text in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def marker_env(platform: str) -> dict[str, str]:
    return {**TARGETS[platform], "python_version": "3.12", "python_full_version": "3.12.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "platform_release": "",
            "platform_version": "", "extra": ""}


def test_the_runtime_markers_pick_one_onnxruntime_per_platform():
    for platform, runtime in RUNTIME.items():
        names = [r.split(">")[0] for r in dependencies(marker_env(platform)) if r.startswith("onnxruntime")]
        assert names == [runtime], (platform, names)
    assert [r for r in dependencies(marker_env("manylinux_2_28_x86_64") | {"platform_machine": "aarch64"})
            if r.startswith("onnxruntime")][0].startswith("onnxruntime>=")
    import tomllib
    from packaging.requirements import Requirement

    (cuda,) = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    assert {p for p in TARGETS if Requirement(cuda).marker.evaluate(marker_env(p))} == {"win_amd64",
                                                                                         "manylinux_2_28_x86_64"}


@pytest.fixture(scope="module")
def registry():
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        urllib.request.urlopen(f"{index}/pip/", timeout=15).close()
    except (urllib.error.URLError, OSError) as e:
        pytest.skip(f"the package registry {index} cannot be reached ({e})")
    return index


def resolve(platform: str) -> dict[str, str]:
    """{name: version} pip would install for `platform` (Python 3.12, wheels only), without installing.

    pip evaluates markers against the machine it runs on, not --platform's, so the project's markers are evaluated
    here for the target; dependencies that the target's markers need and the host's did not are added, until none is
    missing.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env, reqs = marker_env(platform), dependencies(marker_env(platform))
    for _ in range(4):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                               "--only-binary", ":all:", "--platform", platform, "--python-version", "3.12",
                               "--report", "-", *reqs], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{platform}: {done.stderr[-2000:]}"
        installed = {canonicalize_name(i["metadata"]["name"]): i for i in json.loads(done.stdout)["install"]}
        needed = []
        for item in installed.values():
            for text in item["metadata"].get("requires_dist", []):
                req = Requirement(text)
                if canonicalize_name(req.name) not in installed and (req.marker is None or req.marker.evaluate(env)):
                    req.marker = None
                    needed.append(str(req))
        if not needed:
            return {name: i["metadata"]["version"] for name, i in sorted(installed.items())}
        reqs += needed
    raise AssertionError(f"{platform}: dependencies still missing after 4 rounds: {needed}")


@pytest.mark.network
@pytest.mark.parametrize("platform", ["macosx_14_0_arm64", "win_amd64"])
def test_the_dependencies_resolve_for(platform, registry):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    versions = resolve(platform)
    print(f"\n{platform}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    wanted = {canonicalize_name(Requirement(r).name) for r in dependencies(marker_env(platform))}
    assert wanted <= set(versions), wanted - set(versions)
    other = {"onnxruntime": "onnxruntime-gpu", "onnxruntime-gpu": "onnxruntime"}[RUNTIME[platform]]
    assert RUNTIME[platform] in versions and other not in versions
    if platform.startswith("win"):
        assert "colorama" in versions  # click's Windows-only dependency: the target's markers, not this machine's
