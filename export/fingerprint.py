"""What makes two sets of features "the same body features", and the one check every layer uses.

Features of one image are comparable only if they come from the same weights, input size, preprocessing, body
precision and resize policy, stored in the same format. The cache, heads, bundles and predict all carry this
fingerprint and compare it with `compatible()`.
"""

from __future__ import annotations

import hashlib
import json

from .errors import IncompatibleError

FORMAT = 1  # how features are laid out per image (stage outputs flattened (C, H, W)); bump on change
CORE = ("format", "weights_sha256", "image_size", "preprocessing", "dtype")
KEYS = (*CORE, "resize", "layers", "quantization", "outputs")


def body_fingerprint(meta: dict[str, str]) -> dict:
    """The fingerprint of a body model, from its headstart metadata (`export.graph.read_metadata`)."""
    out = {"format": FORMAT, "weights_sha256": meta["weights_sha256"], "image_size": int(meta["image_size"]),
           "preprocessing": meta["preprocessing"], "dtype": meta["dtype"], "layers": meta["layers"].split(",")}
    if "outputs" in meta:  # a wrapped model's layers: which tensor each reads, and its pooling
        out["outputs"] = json.loads(meta["outputs"])
    if "quantization" in meta:  # two int8 bodies differ by their weights' range and calibration photos
        out["quantization"] = quantization_id(meta["quantization"])
    return out


def quantization_id(record: str) -> str:
    """A short name for an int8 body's quantization record: its weight bits and calibration photos."""
    q = json.loads(record)
    photos = hashlib.sha256(json.dumps(sorted(q["calibration"]["sha256"])).encode()).hexdigest()[:12]
    return f"{q.get('weight_bits', 8)}-bit weights, calibration {photos}"  # records without weight_bits: 8 bits


def features_fingerprint(meta: dict[str, str], resize: str) -> dict:
    """The fingerprint of features computed by a body on images decoded with `resize`."""
    return body_fingerprint(meta) | {"resize": resize}


ADVICE = "use a body, cache and head made with the same model and settings"


def compatible(expected: dict, actual: dict, where: str, layer: str | None = None, advice: str = ADVICE) -> None:
    """Raise IncompatibleError unless `actual` (what `where` holds) matches `expected`; the message ends with
    `advice`, what to do.

    Keys only one side knows (a body has no resize policy) are not compared. With `layer`, `actual` must
    provide that layer; without, both must have the same layer set.
    """
    missing = [k for k in CORE if k not in expected or k not in actual]
    diff = [k for k in KEYS if k in expected and k in actual and expected[k] != actual[k]
            and not (k in ("layers", "outputs") and layer is not None)]
    if layer is not None and "outputs" in expected and "outputs" in actual \
            and expected["outputs"].get(layer) != actual["outputs"].get(layer):
        diff.append("outputs")
    if layer is not None and layer not in actual.get("layers", ()):
        diff.append("layers")
    if missing or diff:
        parts = [f"{k} {actual.get(k)!r} (expected {expected.get(k)!r})" for k in missing + diff]
        if layer is not None and "layers" in diff:
            parts[-1] = f"layers {actual.get('layers')} without {layer!r}"
        raise IncompatibleError(f"{where} holds features of another body or setting: {'; '.join(parts)}; {advice}")
