"""Datasets laid out as image folders: scikit-learn's bundled digits (offline) and Oxford-IIIT Pet (download)."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.export.errors import DataError, UsageError
from headstart.export.files import atomic_write, file_digest
from headstart.export.weights import cache_dir

PETS_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
# The md5 pins that torchvision's OxfordIIITPet checks, the only hashes the dataset's hosts publish.
PETS_MD5 = {"images.tar.gz": "5c4f3ee8e5d25df40f4fd59a7f44e54c",
            "annotations.tar.gz": "95a8c909bbe2e81eed6a22bccdf3f68f"}
PARITY = {str(d): "even" if d % 2 == 0 else "odd" for d in range(10)}
# The tags map of the multi-label task: each digit's properties, several or none a digit.
TAGS = {str(d): [t for t, has in (("odd", d % 2 == 1), ("prime", d in (2, 3, 5, 7)), ("loop", d in (0, 6, 8, 9)))
                 if has] for d in range(10)}


# What write_digits writes in its folder, and nothing else.
DIGITS_LAYOUT = {"train", "valid", "parity.yaml", "tags.yaml"}


def _fresh(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; pick a new folder or delete it")
    out.mkdir(parents=True, exist_ok=True)


def write_digits(out: str | Path, valid_fraction: float = 0.2, seed: int = 0, replace: bool = False
                 ) -> dict[str, int]:
    """scikit-learn's 1,797 8x8 digits as PNGs: out/{train,valid}/<digit>/<index>.png, stratified split.

    Also writes out/parity.yaml, the classes map of the odd/even task, and out/tags.yaml, the tags map of a
    multi-label task (odd, prime, loop: a digit has several, or none). Returns images per split. `replace`:
    an earlier digits folder in `out` (train/, valid/ and parity.yaml, nothing else) is deleted first; any
    other content is refused, never deleted.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out)
    if replace and out.is_dir() and any(out.iterdir()):
        found = {p.name for p in out.iterdir()}
        if "parity.yaml" not in found or not found <= DIGITS_LAYOUT:
            raise UsageError(f"{out} holds {', '.join(sorted(found - DIGITS_LAYOUT) or sorted(found))}, not "
                                  "only a digits folder written by `headstart data digits`; refusing to delete it: "
                                  "pick a new folder")
        shutil.rmtree(out)
    _fresh(out)
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, valid = train_test_split(index, test_size=valid_fraction, random_state=seed, stratify=digits.target)
    for split, rows in (("train", train), ("valid", valid)):
        for i in sorted(rows):
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)  # 0..16 ink levels
            Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
    (out / "parity.yaml").write_text("".join(f'"{k}": {v}\n' for k, v in PARITY.items()))
    (out / "tags.yaml").write_text("".join(f'"{k}": [{", ".join(v)}]\n' for k, v in TAGS.items()))
    return {"train": len(train), "valid": len(valid)}


def download(url: str, target: Path, md5: str) -> Path:
    """Download once (kept in the user cache), verified against its md5 before use."""
    if target.exists() and file_digest(target, "md5") == md5:
        return target
    with atomic_write(target) as partial:
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(partial, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except OSError as e:
            raise DataError(f"could not download {url}: {e}; check the network, or give a mirror") from None
        actual = file_digest(partial, "md5")
        if actual != md5:
            raise DataError(f"{url}: md5 {actual} does not match the expected {md5}; refusing the download")
    return target


def write_pets(out: str | Path, base_url: str = PETS_URL, checksums: dict[str, str] | None = None,
               downloads: str | Path | None = None) -> dict[str, int]:
    """Oxford-IIIT Pet as out/{train,valid}/<breed>/*.jpg (trainval -> train, test -> valid).

    Also writes out/species.yaml, the classes map of the cat/dog task. Returns images per split.
    """
    out = Path(out)
    checksums = checksums or PETS_MD5
    store = Path(downloads) if downloads else cache_dir() / "oxford-iiit-pet"
    archives = {name: download(base_url.rstrip("/") + "/" + name, store / name, md5)
                for name, md5 in checksums.items()}
    _fresh(out)
    with tempfile.TemporaryDirectory() as tmp:
        for archive in archives.values():
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")  # no absolute paths, links out, or devices
        notes = Path(tmp) / "annotations"
        species, counts = {}, {}
        for split, listing in (("train", "trainval.txt"), ("valid", "test.txt")):
            counts[split] = 0
            for line in (notes / listing).read_text().splitlines():
                if not line.strip() or line.startswith("#"):
                    continue
                name, _, kind, _ = line.split()
                breed = name.rsplit("_", 1)[0]
                species[breed] = "cat" if kind == "1" else "dog"
                src = Path(tmp) / "images" / f"{name}.jpg"
                if src.exists():
                    (out / split / breed).mkdir(parents=True, exist_ok=True)
                    shutil.move(src, out / split / breed / src.name)
                    counts[split] += 1
    (out / "species.yaml").write_text("".join(f"{b}: {s}\n" for b, s in sorted(species.items())))
    return counts
