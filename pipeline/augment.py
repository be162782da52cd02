"""Augmented views of an image, cached like any other row: each view's spec is a pure function of the image's
content hash and the view's number, so a rerun recomputes nothing and raising K computes only the new views."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
from PIL import Image, ImageEnhance

# Horizontal flip with p 0.5, a random resized crop (area 0.6-1, aspect 3/4-4/3) and colour jitter of +-20%.
# The name goes into every view's key: another policy makes other rows.
POLICY = "flip0.5-crop0.6:1-aspect0.75:1.33-jitter0.2/v1"


def view_spec(content: str, k: int) -> dict:
    """The spec of view `k` of the image whose bytes have sha256 `content`."""
    rng = np.random.default_rng(int(hashlib.sha256(f"{POLICY}:{content}:{k}".encode()).hexdigest()[:16], 16))
    area, aspect = rng.uniform(0.6, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    jitter = rng.uniform(0.8, 1.2, 3)
    return {"k": k, "flip": bool(rng.random() < 0.5), "crop": [round(v, 4) for v in (x0, y0, x0 + w, y0 + h)],
            "brightness": round(float(jitter[0]), 4), "contrast": round(float(jitter[1]), 4),
            "saturation": round(float(jitter[2]), 4)}


def view_key(content: str, spec: dict) -> str:
    """The row key of a view: its content hash and spec, hashed (a plain image's key is its content hash)."""
    return hashlib.sha256(f"{content}:{POLICY}:{json.dumps(spec, sort_keys=True)}".encode()).hexdigest()


def apply(img: Image.Image, spec: dict) -> Image.Image:
    """The view of an RGB image: crop (fractions of the image), flip, then brightness, contrast, saturation."""
    x0, y0, x1, y1 = spec["crop"]
    img = img.crop((round(x0 * img.width), round(y0 * img.height),
                    max(round(x1 * img.width), round(x0 * img.width) + 1),
                    max(round(y1 * img.height), round(y0 * img.height) + 1)))
    if spec["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(spec["brightness"])
    img = ImageEnhance.Contrast(img).enhance(spec["contrast"])
    return ImageEnhance.Color(img).enhance(spec["saturation"])
