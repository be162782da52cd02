"""The int8 body: calibrated on photos, its own fingerprint, and close to float32."""

import json
import warnings

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import generated_images, photos, pixels
from onnx import numpy_helper

from headstart.export import (
    IncompatibleError,
    body_fingerprint,
    build_body,
    compatible,
    cpu,
    open_session,
    read_metadata,
    runtime,
    save,
)
from headstart.export.files import file_digest
from headstart.export.quantize import quantize_int8
from headstart.export.weights import random_weights
from headstart.heads import save_head
from headstart.heads.bundle import bundle_files
from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.train import train_head


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    images = generated_images(root / "calib", 6, classes=("a",), seed=4)
    out = root / "r32-int8.onnx"
    result = CliRunner().invoke(main, ["export", "-o", str(out), "--random-weights", "0", "--image-size", "32",
                                       "--quantize", "int8", "--calibrate", str(root / "calib"),
                                       "--calibrate-count", "4"])
    assert result.exit_code == 0, result.output
    assert "int8 (calibrated on 4 photos" in result.output
    return out, images


def test_int8_export_records_its_calibration(int8_model):
    path, images = int8_model
    meta = read_metadata(path)
    assert meta["dtype"] == "int8" and meta["kind"] == "body"
    q = json.loads(meta["quantization"])
    assert "QDQ, per-channel" in q["method"] and q["onnxruntime"] and q["calibration"]["count"] == 4
    assert set(q["calibration"]["sha256"]) <= {file_digest(p) for p in images}
    model = onnx.load(str(path))
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in model.graph.node}
    assert q["weight_bits"] == 7
    assert weight_range(model) == (-64, 64)  # 2 x 255 x 64 < 2**15: no x86 int8 kernel saturates


def weight_range(model: onnx.ModelProto) -> tuple[int, int]:
    """The smallest and largest stored int8 weight of the convolutions."""
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]  # not the zero points
    assert len(weights) == 13  # one per convolution of VGG16
    return int(min(w.min() for w in weights)), int(max(w.max() for w in weights))


@pytest.fixture(scope="module")
def old_and_new(tmp_path_factory):
    """A 32 px random body quantized with 8-bit weights (before 7 became the default) and with 7."""
    root = tmp_path_factory.mktemp("bits")
    body = build_body(random_weights(0), 32, ("gap",))
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    return {bits: save(quantize_int8(body, x, ["random pixels"], weight_bits=bits), root / f"w{bits}.onnx")
            for bits in (7, 8)}


def test_8_bit_weights_fill_the_range_that_7_bits_halve(old_and_new):
    assert weight_range(onnx.load(str(old_and_new[8]))) == (-127, 127)
    assert weight_range(onnx.load(str(old_and_new[7]))) == (-64, 64)
    with pytest.raises(ValueError, match="weight_bits must be one of"):
        quantize_int8(build_body(random_weights(0), 32, ("gap",)), np.zeros((1, 32, 32, 3), np.uint8), [], 6)


@pytest.mark.parametrize("saturates", [True, False])
def test_an_8_bit_int8_model_warns_once_where_its_kernels_saturate(old_and_new, monkeypatch, saturates):
    monkeypatch.setattr(cpu, "int8_saturates", lambda: saturates)
    monkeypatch.setattr(runtime, "_warned", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            open_session(old_and_new[8], quiet=True)
            open_session(old_and_new[7], quiet=True)
    ours = [w for w in seen if issubclass(w.category, runtime.Int8Warning)]
    assert len(ours) == (1 if saturates else 0)
    if saturates:
        text = str(ours[0].message)
        assert str(old_and_new[8]) in text and "without VNNI" in text and "re-export" in text


def test_the_weight_range_is_part_of_the_fingerprint(old_and_new):
    fp = {bits: body_fingerprint(read_metadata(path)) for bits, path in old_and_new.items()}
    assert fp[7]["quantization"].startswith("7-bit weights") and fp[8]["quantization"].startswith("8-bit weights")
    with pytest.raises(IncompatibleError, match="quantization '8-bit weights"):
        compatible(fp[7], fp[8], "w8.onnx")
    compatible(fp[7], body_fingerprint(read_metadata(old_and_new[7])), "w7.onnx")


def test_cpu_flags_decide_saturation(monkeypatch):
    def with_flags(flags, machine="x86_64"):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: None if flags is None else frozenset(flags.split()))
        monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
        return cpu.int8_saturates()

    assert with_flags("sse4_2 avx2 fma avx512f avx512bw")  # AVX-512 without VNNI still multiplies in 16 bits
    assert not with_flags("avx2 fma avx512f avx512_vnni")
    assert not with_flags("avx2 fma avx_vnni")
    assert not with_flags("avx2", machine="aarch64") and not with_flags(None)


def test_int8_needs_calibration_photos(tmp_path):
    result = CliRunner().invoke(main, ["export", "-o", str(tmp_path / "m.onnx"), "--random-weights", "0",
                                       "--image-size", "32", "--quantize", "int8"])
    assert result.exit_code == 2 and "--quantize int8 needs --calibrate DIR" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_int8_features_never_mix_with_float32_ones(tmp_path, int8_model, random_model):
    data = tmp_path / "d"
    generated_images(data, 3)
    extract(data, random_model, tmp_path / "c.zarr", progress=False)
    result = CliRunner().invoke(main, ["extract", str(data), "--body", str(int8_model[0]),
                                       "--cache", str(tmp_path / "c.zarr")])
    assert result.exit_code == 1 and "dtype 'float32' (expected 'int8')" in result.output
    extract(data, int8_model[0], tmp_path / "q.zarr", progress=False)
    head = save_head(train_head(tmp_path / "q.zarr", "gap", "logistic", valid_fraction=0), tmp_path / "h.head")
    refused = CliRunner().invoke(main, ["evaluate", "--cache", str(tmp_path / "c.zarr"), "--head-file", str(head)])
    assert refused.exit_code == 1 and "dtype 'float32' (expected 'int8')" in refused.output
    bundled = bundle_files(int8_model[0], head)  # an int8 body with its own head bundles like any other
    p = open_session(bundled.SerializeToString(), quiet=True).run(["probabilities"], {"images": pixels(
        sorted(data.rglob("*.jpg")), 32)})[0]
    np.testing.assert_allclose(p, load(head).predict_proba(FeatureCache(tmp_path / "q.zarr").features("gap")),
                               atol=2e-2)


def load(path):
    from headstart.heads import load_head

    return load_head(path)


@pytest.mark.slow
def test_int8_gap_is_close_to_float32_on_photos_not_used_to_calibrate(tmp_path):
    result = CliRunner().invoke(main, ["export", "-o", str(tmp_path / "q.onnx"), "--image-size", "64",
                                       "--quantize", "int8", "--calibrate", str(photos("train", 1)[0].parents[1]),
                                       "--calibrate-count", "16"])
    assert result.exit_code == 0, result.output
    CliRunner().invoke(main, ["export", "-o", str(tmp_path / "f.onnx"), "--image-size", "64"])
    x = pixels(photos("valid", 20), 64)
    a = open_session(tmp_path / "f.onnx", quiet=True).run(["gap"], {"images": x})[0]
    b = open_session(tmp_path / "q.onnx", quiet=True).run(["gap"], {"images": x})[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, cos


def test_bench_int8_compares_both_weight_ranges_with_float32_on_unseen_photos(tmp_path):
    from headstart.pipeline.bench import bench_int8

    generated_images(tmp_path / "d", 4, "train")
    generated_images(tmp_path / "d", 3, "valid", seed=1)
    rows = bench_int8(tmp_path / "d", image_size=32, calibrate_count=4, unseen=6, batch=2, seconds=0.01, turns=2,
                      weights=random_weights(0))
    assert [r["body"] for r in rows] == ["float32", "int8, 7-bit weights", "int8, 8-bit weights"]
    assert rows[0]["cos_min"] == pytest.approx(1, abs=1e-6) and rows[0]["speedup"] == 1
    assert all(r["unseen"] == 6 and 0 < r["cos_min"] <= r["cos_mean"] <= 1 + 1e-6 and r["img_s"] > 0 for r in rows)
