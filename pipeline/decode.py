"""Image bytes -> uint8 RGB (S, S, 3), or a BadImage that says why not."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

RESIZE = ("squash", "center-crop")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold, applied as a hard limit


class BadImage(Exception):
    """An input that is not a usable image; the message is the reason recorded for it."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's own I;16 -> RGB conversion clips at 255 instead of scaling; keep the top 8 bits.
        a = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode(data: bytes, size: int, resize: str = "squash") -> np.ndarray:
    """Decode image bytes (JPEG, PNG, WebP, BMP, GIF's first frame, ...) to uint8 RGB (size, size, 3).

    EXIF orientation is applied. `squash` resizes to size x size whatever the aspect ratio (as Keras does);
    `center-crop` scales the short side to `size` and crops the middle.
    """
    if resize not in RESIZE:
        raise ValueError(f"unknown resize policy {resize!r}; use squash or center-crop")
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
    if resize == "center-crop":
        scale = size / min(img.size)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def read_and_decode(path: str, size: int, resize: str = "squash") -> np.ndarray:
    """Decode a file; an unreadable file is a BadImage too."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or type(e).__name__})") from None
    return decode(data, size, resize)


def load_or_reason(path: str, size: int, resize: str = "squash") -> np.ndarray | str:
    """Pixels of a file, or the reason it is not a usable image: for pipelines that record and go on."""
    try:
        return read_and_decode(path, size, resize)
    except BadImage as e:
        return str(e)
