"""A model's metadata_props read straight from the protobuf bytes, without importing onnx: `headstart info`
stays fast. The graph (ModelProto field 7, nearly all of the file) is skipped by its length, never read."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from .errors import ModelError

META_PREFIX = "headstart."  # as export.graph writes them
_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {key = 1, value = 2}


def _varint(f: BinaryIO) -> int | None:
    shift = value = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise ValueError("truncated varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _entry(data: bytes) -> tuple[str, str]:
    key = value = ""
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        length, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        text = data[i:i + length].decode()
        i += length
        if tag == (1 << 3 | 2):
            key = text
        elif tag == (2 << 3 | 2):
            value = text
    return key, value


def model_metadata(path: str | Path) -> dict[str, str]:
    """Headstart's metadata_props of an ONNX model, without the prefix: the fields of the file's ModelProto are
    walked and every one but metadata_props skipped, so neither onnx nor the weights are loaded."""
    path = Path(path)
    out = {}
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            while (tag := _varint(f)) is not None:
                field, wire = tag >> 3, tag & 7
                if wire == 0:
                    _varint(f)
                elif wire == 1:
                    f.seek(8, 1)
                elif wire == 5:
                    f.seek(4, 1)
                elif wire == 2:
                    length = _varint(f)
                    if length is None or f.tell() + length > size:
                        raise ValueError("truncated field")
                    if field == _METADATA_PROPS:
                        key, value = _entry(f.read(length))
                        if key.startswith(META_PREFIX):
                            out[key[len(META_PREFIX):]] = value
                    else:
                        f.seek(length, 1)
                else:
                    raise ValueError(f"wire type {wire}")
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not a readable ONNX model ({e})") from None
    return out
