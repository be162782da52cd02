import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import committed_rows, generated_images, kill_9_after, link_photos
from PIL import Image

from headstart.export import build_body, open_session, save
from headstart.export.weights import random_weights
from headstart.pipeline.cache import CacheError, CacheWriter, FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.dataset import scan
from headstart.pipeline.decode import BadImage, decode
from headstart.pipeline.extract import extract


def test_overlapping_folders_reuse_cached_rows(tmp_path, random_model, monkeypatch):
    train = generated_images(tmp_path / "pool" / "train", 15, seed=1)
    valid = generated_images(tmp_path / "pool" / "valid", 10, seed=2)
    data = link_photos(train, tmp_path / "catsdogs", "train")
    link_photos(valid, data, "valid")
    cache = tmp_path / "c.zarr"
    first = extract(data, random_model, cache, progress=False)
    assert (first.files, first.reused, first.computed, first.skipped) == (50, 0, 50, 0)

    # Another folder: 10 of the training photos, 6 of the valid ones, and 8 photos the cache has never seen.
    overlap = train[:5] + train[15:20] + valid[:3] + valid[10:13]
    new = generated_images(tmp_path / "pool" / "new", 4, seed=3)
    other = link_photos(overlap + new, tmp_path / "other")
    second = extract(other, random_model, cache, progress=False)
    assert (second.files, second.reused, second.computed) == (24, 16, 8)
    assert "24 files, 16 reused, 8 computed" in second.line()

    a, b = FeatureCache(cache, "catsdogs"), FeatureCache(cache, "other")
    assert FeatureCache(cache, "catsdogs").rows == 58  # one row per distinct content
    assert a.classes == b.classes == ["a", "b"]
    assert sorted(set(b.splits)) == ["train"] and len(b) == 24
    # Reused rows give the very features computed the first time, by content.
    by_hash = dict(zip(a.hashes, a.features("pool5"), strict=True))
    for h, x in zip(b.hashes, b.features("pool5"), strict=True):
        if h in by_hash:
            np.testing.assert_array_equal(x, by_hash[h])
    # The features are the model's, stored as float16.
    x = np.stack([decode(open(p, "rb").read(), 32) for p in a.paths[:4]])
    want = open_session(random_model, quiet=True).run(["gap"], {"images": x})[0]
    np.testing.assert_allclose(a.features("gap")[:4], want, rtol=2e-3, atol=1e-3)
    # A second run over the same folder computes nothing and opens no onnxruntime session.
    import headstart.pipeline.extract

    def no_session(*args, **kwargs):
        raise AssertionError("onnxruntime was called")

    monkeypatch.setattr(headstart.pipeline.extract, "open_session", no_session)
    again = extract(data, random_model, cache, progress=False)
    assert (again.reused, again.computed) == (50, 0)


@pytest.mark.parametrize("other,message", [
    (dict(seed=1), "weights_sha256"),
    (dict(dtype="float16"), "dtype 'float32' (expected 'float16')"),
    (dict(layers=("gap",)), "layers ['gap', 'pool5'] (expected ['gap'])"),
    (dict(resize="center-crop"), "resize 'squash' (expected 'center-crop')"),
])
def test_features_of_another_body_or_setting_are_refused(tmp_path, random_model, other, message):
    generated_images(tmp_path / "d", 2)
    cache = tmp_path / "c.zarr"
    extract(tmp_path / "d", random_model, cache, progress=False)
    model = random_model
    if "resize" not in other:
        model = save(build_body(random_weights(other.get("seed", 0)), 32, other.get("layers", ("gap", "pool5")),
                                other.get("dtype", "float32")), tmp_path / "other.onnx")
    args = ["extract", str(tmp_path / "d"), "--body", str(model), "--cache", str(cache),
            "--resize", other.get("resize", "squash")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{cache} holds features of another body or setting" in result.output and message in result.output
    assert "--replace to start it afresh" in result.output
    assert FeatureCache(cache).rows == 4


def test_a_second_writer_is_stopped_with_a_clear_message(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 2)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, progress=False)
    from headstart.export import features_fingerprint, read_metadata

    meta = read_metadata(random_model)
    with CacheWriter(cache, features_fingerprint(meta, "squash"), meta, {"gap": 512, "pool5": 512}):
        result = CliRunner().invoke(main, ["extract", str(data), "--body", str(random_model), "--cache", str(cache)])
    assert result.exit_code != 0
    assert f"is being written by pid {os.getpid()}" in result.output
    assert len(FeatureCache(cache)) == 4


@pytest.mark.parametrize("make,message", [
    (lambda p: p, "no such folder or .csv manifest"),
    (lambda p: (p.mkdir(), p)[1], "no image files found"),
    (lambda p: ((p / "a" / "b").mkdir(parents=True), p)[1], "cannot tell the layout: a/ is read as a class folder"),
    (lambda p: ((p / "train" / "b").mkdir(parents=True), p)[1], "no image files found"),
])
def test_empty_or_mistyped_data_fails_before_any_work(tmp_path, random_model, make, message):
    data = make(tmp_path / "data")
    result = CliRunner().invoke(main, ["extract", str(data), "--body", str(random_model),
                                       "--cache", str(tmp_path / "c.zarr")])
    assert result.exit_code != 0 and message in result.output and str(data) in result.output
    assert not (tmp_path / "c.zarr").exists()


def _salt(folder):
    """One bad file of each kind, and good images in every mode and format that must be accepted."""
    sample = generated_images(folder.parent.parent / "sample", 1, classes=("x",), seed=9)[0]
    real = sample.read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        "zero.jpg": (b"", "zero-byte file"),
        "truncated.jpg": (real[: len(real) // 2], "truncated or corrupt image"),
        "notes.jpg": (b"this is not an image\n" * 20, "not an image"),
        "README.txt": (b"a stray text file", "not an image"),
    }
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    Image.new("1", (12000, 8000)).save(folder / "bomb.png")
    bad["bomb.png"] = (None, "decompression bomb")
    rgb = Image.open(sample)
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.save(folder / "photo.webp")
    rgb.save(folder / "photo.bmp")
    Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(folder / "sixteen.png")
    return bad


def test_bad_files_are_recorded_and_skipped(tmp_path, random_model):
    data = tmp_path / "salted"
    generated_images(data, 3)
    bad = _salt(data / "cats")
    cache = tmp_path / "c.zarr"
    result = CliRunner().invoke(main, ["extract", str(data), "--body", str(random_model), "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert "18 files, 0 reused, 18 computed" in result.output and "5 skipped" in result.output
    fc = FeatureCache(cache)
    assert len(fc) == 13  # 6 images + 7 good images in other formats
    reasons = {os.path.basename(s["path"]): s["reason"] for s in fc.skipped}
    assert set(reasons) == set(bad)
    for name, (_, why) in bad.items():
        assert reasons[name].startswith(why), (name, reasons[name])
    info = CliRunner().invoke(main, ["info", str(cache)])
    assert "skipped: 5" in info.output and "zero.jpg: zero-byte file" in info.output


def test_decode_modes_and_exif_orientation():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    x = decode(buf.getvalue(), 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    assert x[2, 16, 2] > 200 and x[29, 16, 0] > 200  # the blue half is now on top
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(buf, "PNG")
    assert decode(buf.getvalue(), 32).min() == 255
    with pytest.raises(BadImage, match="zero-byte"):
        decode(b"", 32)


def test_scan_layouts(tmp_path):
    src = generated_images(tmp_path / "pool", 2, classes=("cat", "dog"))
    flat = tmp_path / "test1"
    flat.mkdir()
    for p in src:
        (flat / p.name).symlink_to(p)
    ds = scan(flat)
    assert ds.labels == [-1] * 4 and set(ds.splits) == {"test"}
    (tmp_path / "m.csv").write_text("path,label,split\n" + "".join(
        f"{p},{'cat' if 'cat' in p.name else ''},{'valid' if i % 2 else 'train'}\n" for i, p in enumerate(src)))
    ds = scan(tmp_path / "m.csv")
    assert ds.name == "m" and ds.classes == ["cat"] and ds.labels == [0, 0, -1, -1]
    assert ds.splits == ["train", "valid", "train", "valid"]


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 120)
    cmd = [sys.executable, "-m", "headstart.pipeline.cli", "extract", str(data), "--body", str(random_model),
           "--batch-size", "4", "--jobs", "1"]
    whole = tmp_path / "whole.zarr"
    subprocess.run([*cmd, "--cache", str(whole)], check=True, capture_output=True)

    cache = tmp_path / "killed.zarr"
    killed_at = kill_9_after([*cmd, "--cache", str(cache)], cache, 40)
    assert 40 <= killed_at < 240, "the kill must land mid-run"
    with pytest.raises(CacheError, match="incomplete|no complete dataset"):
        FeatureCache(cache)  # readers do not mistake the half-written cache for a full one

    done = subprocess.run([*cmd, "--cache", str(cache)], check=True, capture_output=True, text=True)
    assert f"{killed_at} reused, {240 - killed_at} computed" in done.stdout
    a, b = FeatureCache(whole), FeatureCache(cache)
    assert a.rows == b.rows == 240
    assert list(a.paths) == list(b.paths) and list(a.hashes) == list(b.hashes)
    for layer in ("gap", "pool5"):
        np.testing.assert_array_equal(a.features(layer), b.features(layer))


def test_interrupted_run_leaves_no_partial_rows_visible(tmp_path, random_model, monkeypatch):
    """Ctrl-C inside a batch: committed rows stay, the rest is redone on the next run."""
    data = tmp_path / "d"
    generated_images(data, 10)
    cache = tmp_path / "c.zarr"
    import headstart.pipeline.cache as cache_mod

    calls = {"n": 0}
    original = cache_mod.CacheWriter.append

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cache_mod.CacheWriter, "append", flaky)
    result = CliRunner().invoke(main, ["extract", str(data), "--body", str(random_model), "--cache", str(cache),
                                       "--batch-size", "4"])
    assert result.exit_code != 0 and "rerun the same command to resume" in result.output
    assert committed_rows(cache) == 8
    monkeypatch.setattr(cache_mod.CacheWriter, "append", original)
    report = extract(data, random_model, cache, batch_size=4, progress=False)
    assert (report.reused, report.computed) == (8, 12)
    shutil.rmtree(cache)
