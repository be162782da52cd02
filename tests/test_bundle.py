import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import link_photos, photos

from headstart.heads import load_head, save_head
from headstart.heads.bundle import bundle_files
from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.train import train_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlp_head(photo_cache, tmp_path_factory):
    head = train_head(photo_cache, "pool5", "mlp", hidden=(64,), epochs=5)
    return save_head(head, tmp_path_factory.mktemp("heads") / "catsdogs.head")


def test_bundle_equals_head_on_cached_features(photo_model, mlp_head, tmp_path):
    out = tmp_path / "catsdogs.onnx"
    result = CliRunner().invoke(main, ["bundle", "--body", str(photo_model), "--head-file", str(mlp_head),
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert 'classes ["cats", "dogs"]' in result.output
    # float32 features of photos the head never saw, cached, then the same files through the bundle.
    data = link_photos(photos("train")[-12:] + photos("valid", 4), tmp_path / "new")
    extract(data, photo_model, tmp_path / "f32.zarr", dtype="float32", progress=False)
    fc = FeatureCache(tmp_path / "f32.zarr")
    want = load_head(mlp_head).predict_proba(fc.features("pool5"))
    result = CliRunner().invoke(main, ["predict", str(data), "--classifier", str(out), "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    got = np.array([[float(rows[p]["cats"]), float(rows[p]["dogs"])] for p in fc.paths])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert [rows[p]["label"] for p in fc.paths] == [["cats", "dogs"][i] for i in want.argmax(1)]


def test_float16_bundle_agrees(photo_model, mlp_head, tmp_path):
    import onnxruntime as ort

    from headstart.pipeline.decode import read_and_decode

    x = np.stack([read_and_decode(str(p), 96) for p in photos("valid", 8)])
    p32, p16 = (ort.InferenceSession(bundle_files(photo_model, mlp_head, d).SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": x})[0]
                for d in ("float32", "float16"))
    assert np.abs(p32 - p16).max() < 2e-2


def test_bundle_runs_in_plain_onnxruntime(photo_model, mlp_head, tmp_path):
    from headstart.export import save

    path = save(bundle_files(photo_model, mlp_head), tmp_path / "m.onnx")
    code = f"""
import json, sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
meta = s.get_modelmeta().custom_metadata_map
p, label = s.run(None, {{"images": np.zeros((3, 96, 96, 3), np.uint8)}})
assert not [m for m in sys.modules if m.split(".")[0] in ("headstart", "export", "heads", "pipeline")]
print(json.dumps({{"classes": json.loads(meta["headstart.classes"]), "p": p.shape, "label": label.tolist()}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert out["classes"] == ["cats", "dogs"] and out["p"] == [3, 2] and len(out["label"]) == 3


def test_predict_lists_bad_images_and_clips(photo_model, mlp_head, tmp_path):
    from headstart.export import save

    model = save(bundle_files(photo_model, mlp_head), tmp_path / "m.onnx")
    test1 = tmp_path / "test1"
    test1.mkdir()
    for i, p in enumerate(photos("valid", 3), start=1):
        (test1 / f"{i}.jpg").symlink_to(p)
    (test1 / "7.jpg").write_bytes(b"")
    result = CliRunner().invoke(main, ["predict", str(test1), "--classifier", str(model), "-o", str(tmp_path / "s.csv"),
                                       "--clip", "0.02,0.98"])
    assert result.exit_code == 0, result.output
    assert "6 predicted, 1 skipped" in result.output and "7.jpg: zero-byte file" in result.output
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6", "7"]
    probs = np.array([[float(r["cats"]), float(r["dogs"])] for r in rows[:6]])
    assert probs.min() >= 0.02 and probs.max() <= 0.98
    assert rows[6]["label"] == "" and rows[6]["error"] == "zero-byte file"
    bad = CliRunner().invoke(main, ["predict", str(test1), "--classifier", str(model), "--clip", "0.9,0.1"])
    assert bad.exit_code != 0 and "--clip" in bad.output


def test_bundle_refuses_a_head_of_another_model(tiny_model, mlp_head, tmp_path):
    result = CliRunner().invoke(main, ["bundle", "--body", str(tiny_model), "--head-file", str(mlp_head),
                                       "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{tiny_model} holds features of another body or setting: image_size 32 (expected 96)" in result.output


def test_bench_epochs_measures_three_ways(tmp_path):
    result = CliRunner().invoke(main, ["bench", "epochs", "--images", "16", "--image-size", "32", "--batch-size", "8",
                                       "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    cached, frozen, full, once, tune1, tune3, keras5 = rows
    assert "last 1 conv on cached pool4" in tune1["epoch"] and "Keras way" in keras5["epoch"]
    assert keras5["seconds"] > tune3["seconds"] > 0 and keras5["gflop_per_image"] > tune3["gflop_per_image"]
    assert frozen["seconds"] > cached["seconds"] and full["seconds"] > frozen["seconds"]
    assert frozen["gflop_per_image"] == pytest.approx(30.7 * (32 / 224) ** 2, rel=0.01)
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
