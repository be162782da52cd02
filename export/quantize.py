"""An int8 body for CPUs: onnxruntime's static quantization, calibrated on real photos.

Only the convolutions are quantized (QDQ, per-channel int8 weights in 7 bits, uint8 activations); the preprocessing
at the input and the pooled outputs stay float32. Static, because dynamic quantization re-measures activations
at every call and runs convolutions slower than float32. The weights keep to 7 bits (onnxruntime's `reduce_range`)
because x86 CPUs without VNNI sum u8 x s8 pairs in 16 bits, which saturates with full 8-bit weights; VNNI CPUs
run 7-bit weights at the same speed, so one model is accurate on every host.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import UsageError
from .graph import META_PREFIX

QUANTIZE = ("none", "int8")
METHOD = "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 activations, Conv only, MinMax"
WEIGHT_BITS = (7, 8)  # 7: accurate on every x86 CPU; 8: the old way, for comparisons only


def quantize_int8(model: onnx.ModelProto, images: np.ndarray, sources: list[str],
                  weight_bits: int = WEIGHT_BITS[0]) -> onnx.ModelProto:
    """An int8 copy of a float32 headstart body, calibrated on `images` uint8 (N, S, S, 3).

    `sources` identify the calibration photos (their sha256), kept in the metadata with the method, the weight
    bits and the onnxruntime version; the model's dtype becomes "int8", so its features never mix with float32
    ones. `weight_bits` 8 saturates on x86 CPUs without VNNI; it exists to measure and test that.
    """
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if meta.get("kind") != "body" or meta.get("dtype") != "float32":
        raise UsageError(f"int8 quantization starts from a float32 body, not a {meta.get('dtype')} "
                         f"{meta.get('kind')}; export with --dtype float32")
    if weight_bits not in WEIGHT_BITS:
        raise UsageError(f"weight_bits must be one of {WEIGHT_BITS}, not {weight_bits!r}")
    size = int(meta["image_size"])
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8 or not len(images):
        raise UsageError(f"calibration images must be uint8 (N, {size}, {size}, 3) with N >= 1, "
                         f"got {images.dtype} {images.shape}")

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": images[i:i + 1]} for i in range(len(images))])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the model is for graphs without shapes; ours have them
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "float32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, str(src))
            quantize_static(str(src), str(dst), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=["Conv"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, reduce_range=weight_bits == 7)
            out = onnx.load(str(dst))
    finally:
        root.setLevel(level)
    meta |= {"dtype": "int8", "quantization": json.dumps({
        "method": METHOD, "weight_bits": weight_bits, "onnxruntime": onnxruntime.__version__,
        "calibration": {"count": len(images), "sha256": sources}})}
    del out.metadata_props[:]
    onnx.helper.set_model_props(out, {META_PREFIX + k: str(v) for k, v in meta.items()})
    return out
