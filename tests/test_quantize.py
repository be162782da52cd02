"""The int8 body: calibrated on photos, its own fingerprint, and close to float32."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import generated_images, photos, pixels

from headstart.export import open_session, read_metadata
from headstart.export.files import file_digest
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
    ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


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
