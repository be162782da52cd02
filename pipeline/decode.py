"""Image bytes -> uint8 RGB (S, S, 3), or a BadImage that says why not."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from headstart.export.errors import UsageError

from . import augment
from .storage import filesystem, is_url

RESIZE = ("squash", "center-crop")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold, applied as a hard limit
MAX_BYTES = 256 * 2**20  # per file; generous for photos, and a 3 GB sparse file is not read into memory


class BadImage(Exception):
    """An input that is not a usable image; the message is the reason recorded for it."""


@dataclass(frozen=True)
class Unreadable:
    """What a read gives for a file that is not a usable image: the reason, as the cache records it."""

    reason: str


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's own I;16 -> RGB conversion clips at 255 instead of scaling; keep the top 8 bits.
        a = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes, size: int, resize: str = "squash", view: dict | None = None) -> np.ndarray:
    """Decode image bytes (JPEG, PNG, WebP, BMP, GIF's first frame, ...) to uint8 RGB (size, size, 3).

    EXIF orientation is applied. `squash` resizes to size x size whatever the aspect ratio (as Keras does);
    `center-crop` scales the short side to `size` and crops the middle. `view`: an augmented view's spec
    (pipeline.augment), applied to the full image before the resize.
    """
    if resize not in RESIZE:
        raise UsageError(f"unknown resize policy {resize!r}; use squash or center-crop")
    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(f"decompression bomb: {img.width}x{img.height} pixels exceed {MAX_PIXELS}")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"truncated or corrupt image ({str(e).strip() or type(e).__name__})") from None
    if view is not None:
        img = augment.apply(img, view)
    if resize == "center-crop":
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def read_bytes(path: str, max_bytes: int = MAX_BYTES) -> bytes:
    """A regular file's bytes, at most `max_bytes` of them; anything else is a BadImage saying why.

    Devices, FIFOs and sockets are refused before they are opened (reading /dev/zero never ends).
    `path` may be an fsspec URL (s3://bucket/a.jpg).
    """
    if is_url(path):
        return _read_url(path, max_bytes)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise BadImage("not a regular file")
        if st.st_size > max_bytes:
            raise BadImage(f"{st.st_size} bytes, over the {max_bytes}-byte limit per file (--max-file-size)")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or type(e).__name__})") from None
    if len(data) > max_bytes:
        raise BadImage(f"grew over the {max_bytes}-byte limit per file while being read")
    return data


def _read_url(url: str, max_bytes: int) -> bytes:
    """One ranged GET: at most max_bytes + 1 bytes are fetched, whatever the object's size."""
    try:
        fs, inner = filesystem(url)
        data = fs.cat_file(inner, start=0, end=max_bytes + 1)
    except (OSError, ValueError) as e:
        raise BadImage(f"unreadable ({type(e).__name__}: {e})") from None
    if len(data) > max_bytes:
        raise BadImage(f"over the {max_bytes}-byte limit per file (--max-file-size)")
    return data


def sha256_of(path: str, max_bytes: int = MAX_BYTES) -> tuple[str | None, str | None]:
    """(hex digest, None), or (None, reason) for a file that cannot be read."""
    try:
        return hashlib.sha256(read_bytes(path, max_bytes)).hexdigest(), None
    except BadImage as e:
        return None, str(e)


def hash_files(paths: list[str], max_bytes: int, threads: int) -> Iterator[tuple[str | None, str | None]]:
    """sha256_of each path, in order, `threads` files read at once."""
    with ThreadPoolExecutor(threads) as pool:
        yield from pool.map(lambda p: sha256_of(p, max_bytes), paths)


def read_and_decode(path: str, size: int, resize: str = "squash", max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Decode a file; an unreadable file is a BadImage too."""
    return decode(read_bytes(path, max_bytes), size, resize)


def load(path: str, size: int, resize: str = "squash", max_bytes: int = MAX_BYTES,
         view: dict | None = None) -> tuple[np.ndarray | Unreadable, str | None]:
    """(pixels, sha256 of the bytes they came from), or (Unreadable(why), sha256 or None).

    The file is read once: the digest and the pixels describe the same bytes, even if it changes meanwhile.
    """
    try:
        data = read_bytes(path, max_bytes)
    except BadImage as e:
        return Unreadable(str(e)), None
    digest = hashlib.sha256(data).hexdigest()
    try:
        return decode(data, size, resize, view), digest
    except BadImage as e:
        return Unreadable(str(e)), digest
