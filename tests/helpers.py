"""What tests share that is not a fixture: the repository and photo paths, generated images, real photos for
slow tests, and helpers that watch a cache from outside (pytest's docs advise against importing conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.pipeline.decode import read_and_decode

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HEADSTART_DATA") or REPO.parent / "shared" / "data") / "catsdogs"
STRICT = os.environ.get("HEADSTART_STRICT_DATA") == "1"
REAL = {"real_weights", "small_model", "tiny_model", "photo_model", "photo_cache"}
_slow = {"now": False}


def allow_real_photos() -> None:
    """For fixtures of slow tests: they are set up before the per-test gate below knows the test is slow."""
    _slow["now"] = True


def photos(split: str = "train", per_class: int | None = None) -> list[Path]:
    """Sorted real cat and dog photos of a split, `per_class` of each (integration tests only)."""
    if not _slow["now"]:
        pytest.fail("real photos are for tests marked slow; hermetic tests use generated_images()")
    if not DATA.is_dir():
        why = f"no photos: {DATA} is missing (set HEADSTART_DATA to the folder holding catsdogs/)"
        if STRICT:
            pytest.fail(f"{why}; HEADSTART_STRICT_DATA=1 makes that a failure")
        pytest.skip(why)
    out = []
    for cls in ("cats", "dogs"):
        files = sorted((DATA / split / cls).glob("*.jpg"), key=lambda p: p.name)
        out += files[:per_class] if per_class else files
    return out


def generated_images(root: Path, per_class: int, split: str | None = None, classes: tuple[str, ...] = ("a", "b"),
                     seed: int = 0, fmt: str = "JPEG") -> list[Path]:
    """Small distinct images in root/[split/]<class>/, each class with its own colour: hermetic test data."""
    rng = np.random.default_rng(seed)
    out = []
    for c, cls in enumerate(classes):
        folder = root / split / cls if split else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([255 * (c % 2), 127 * (c % 3), 255 * (1 - c % 2)], np.float64)
        for i in range(per_class):
            x = np.clip(base + rng.normal(0, 60, (40, 48, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{cls}.{seed}.{i}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
            Image.fromarray(x).save(path, fmt)
            out.append(path)
    return out


def pixels(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([read_and_decode(str(p), size) for p in paths])


def link_photos(paths: list[Path], root: Path, split: str | None = None) -> Path:
    """Lay out photos as root/[split/]<class>/<name> with symlinks: the bytes stay in ../shared."""
    for p in paths:
        folder = root / split / p.parent.name if split else root / p.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / p.name).symlink_to(p)
    return root


def committed_rows(cache: Path | str) -> int:
    """The commit point of a cache (a folder or a URL), read as a plain reader would, without headstart;
    0 before there is one."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{cache}/zarr.json")
    try:  # one GET: the writer replaces the object all the time
        return json.loads(fs.cat_file(path)).get("attributes", {}).get("rows", 0)
    except FileNotFoundError:
        return 0


def kill_9_after(cmd: list[str], cache: Path | str, rows: int, group: bool = False) -> int:
    """Run `cmd`, SIGKILL it once `cache` has committed at least `rows` rows; returns the commit point then.

    `group`: kill the whole process group (a client with its LocalCluster's workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=group)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and committed_rows(cache) < rows:
        time.sleep(0.02)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return committed_rows(cache)


def run_head_graph(head, X: np.ndarray) -> np.ndarray:
    """The head's own ONNX nodes alone, on float32 features: what the bundle appends to the body."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from headstart.export.graph import IR_VERSION, OPSET
    from headstart.heads.bundle import head_nodes

    nodes, inits, h = head_nodes(head, "x")
    nodes.append(helper.make_node("Softmax", [h], ["p"], axis=1))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", X.shape[1]])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", len(head.classes_)])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["p"], {"x": X.astype(np.float32)})[0]
