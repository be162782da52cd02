"""Caches and images in an object store: a real S3 API (moto's server on 127.0.0.1) through s3fs, and memory://."""

import json
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import generated_images, kill_9_after

from headstart.export.fingerprint import features_fingerprint
from headstart.export.graph import read_metadata
from headstart.pipeline import locks
from headstart.pipeline.cache import CacheError, CacheWriter, FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.decode import BadImage, read_bytes
from headstart.pipeline.extract import extract

pytest.importorskip("s3fs", reason="the s3 extra: pip install 'headstart[s3]'")


def cli(*args, ok: bool = True) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def writer(cache, model) -> CacheWriter:
    meta = read_metadata(model)
    return CacheWriter(cache, features_fingerprint(meta, "squash"), meta, {"gap": 4})


def same(a, b, n):
    a, b = FeatureCache(a), FeatureCache(b)
    assert list(a.hashes) == list(b.hashes) and list(a.labels) == list(b.labels) and len(a) == n
    for layer in ("gap", "pool5"):
        np.testing.assert_array_equal(a.features(layer), b.features(layer))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    generated_images(root / "d", 12, "train")
    generated_images(root / "d", 4, "valid", seed=1)
    return root / "d"


def test_images_and_cache_on_s3_give_the_local_features_and_train(s3, data, random_model, tmp_path):
    bucket = s3()
    fsspec.filesystem("s3").put(str(data), f"{bucket}/photos", recursive=True)
    cache = f"{bucket}/features.zarr"
    out = cli("extract", f"{bucket}/photos", "--body", random_model, "--cache", cache, "--batch-size", 8)
    assert "32 files, 0 reused, 32 computed" in out
    extract(data, random_model, tmp_path / "local.zarr", batch_size=8, progress=False)
    same(cache, tmp_path / "local.zarr", 32)
    assert FeatureCache(cache).paths[0].startswith(f"{bucket}/photos/train/a/")
    assert "32 committed rows verified, no problems" in cli("verify", "--cache", cache)
    assert "32 files, 32 reused, 0 computed" in cli("extract", f"{bucket}/photos", "--body", random_model,
                                                     "--cache", cache)
    # The lock lives beside the store, not in it: plain zarr tools see only their own objects there.
    fs = fsspec.filesystem("s3")
    inside = [k for k in fs.find(f"{bucket}/features.zarr") if not k.endswith("zarr.json") and "/c/" not in k]
    assert inside == [] and fs.ls(f"{bucket}/features.zarr.lock")
    cli("train", "--cache", cache, "--head", "logistic", "-o", tmp_path / "h.head")
    assert "accuracy" in cli("evaluate", "--cache", cache, "--head-file", tmp_path / "h.head")
    # Streamed from the bucket block by block, as from a disk: the same head.
    streamed = cli("train", "--cache", cache, "--layer", "pool5", "--head", "softmax", "--memory", "2KB", "-o",
                   tmp_path / "s.head")
    assert "streaming them from the cache in" in streamed
    cli("train", "--cache", tmp_path / "local.zarr", "--layer", "pool5", "--head", "softmax", "--memory", "2KB",
        "-o", tmp_path / "l.head")
    a, b = (np.load(tmp_path / f, allow_pickle=False) for f in ("s.head", "l.head"))
    weights = [k for k in a.files if k != "meta"]  # meta records times and the cache's name
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in weights)
    assert "rows: 32" in cli("info", cache)
    cli("bundle", "--body", random_model, "--head-file", tmp_path / "h.head", "-o", tmp_path / "c.onnx")
    out = cli("predict", f"{bucket}/photos", "--classifier", tmp_path / "c.onnx", "-o", tmp_path / "p.csv")
    assert "32 predicted, 0 skipped" in out
    assert (tmp_path / "p.csv").read_text().count(f"{bucket}/photos/") == 32


def test_a_manifest_in_the_store_names_its_images_relative_to_itself(s3, data, random_model, tmp_path):
    bucket = s3()
    fs = fsspec.filesystem("s3")
    fs.put(str(data), f"{bucket}/photos", recursive=True)
    images = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
    lines = [f"photos/{p},{p.split('/')[1]}" for p in images[:5]] + [f"{bucket}/photos/{images[5]},b"]
    fs.pipe_file(f"{bucket}/m.csv", ("path,label\n" + "\n".join(lines)).encode())
    url = f"{bucket}/photos/{images[0]}"
    assert read_bytes(url) == (data / images[0]).read_bytes()
    with pytest.raises(BadImage, match="over the 100-byte limit per file"):
        read_bytes(url, max_bytes=100)  # one ranged GET of 101 bytes, however large the object
    with pytest.raises(BadImage, match="unreadable .*FileNotFoundError"):
        read_bytes(f"{bucket}/photos/none.jpg")
    memory = f"memory://m-{time.time_ns()}.zarr"
    report = extract(f"{bucket}/m.csv", random_model, memory, progress=False)
    assert (report.files, report.computed, report.skipped) == (6, 6, 0)
    extract(f"{bucket}/m.csv", random_model, f"file://{tmp_path}/f.zarr", progress=False)  # file:// is a folder
    same(memory, tmp_path / "f.zarr", 6)


def test_a_second_writer_is_refused_with_the_holder_named_until_the_lease_is_free(s3, random_model):
    cache = f"{s3()}/c.zarr"
    first = writer(cache, random_model)
    with pytest.raises(CacheError, match=r"is being written by pid \d+ on .* since .*lease"):
        writer(cache, random_model)
    first.close()
    writer(cache, random_model).close()  # released: the next one takes it


def lease(fs, where: str, number: int, **holder) -> None:
    fs.pipe_file(f"{where}/{number:010d}", json.dumps({"host": "elsewhere", "pid": 7, "since": "then", **holder}
                                                      ).encode())


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(s3, random_model):
    cache = f"{s3()}/c.zarr"
    fs = fsspec.filesystem("s3")
    lease(fs, f"{cache}.lock", 3, expires=time.time() + 600)
    with pytest.raises(CacheError, match="pid 7 on elsewhere since then"):
        writer(cache, random_model)
    lease(fs, f"{cache}.lock", 4, expires=time.time() - 1)  # its holder stopped renewing: it died
    taker = writer(cache, random_model)
    assert taker._lock.number == 5
    taker.close()
    assert [n.rsplit("/", 1)[1] for n in fs.ls(f"{cache}.lock")] == ["0000000005"]


def test_a_writer_that_lost_its_lease_commits_nothing_more(random_model, tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "LEASE_SECONDS", 0.4)
    cache = f"memory://lost-{time.time_ns()}.zarr"
    fs = fsspec.filesystem("memory")
    w = writer(cache, random_model)
    w.append(["aa" * 32], {"gap": np.ones((1, 4), np.float32)}, {})
    time.sleep(0.3)  # renewed meanwhile: still the holder
    w.append(["bb" * 32], {"gap": np.ones((1, 4), np.float32)}, {})
    # A newcomer that took the lease over (as after a long network partition) fences the old holder out.
    lease(fs, f"{cache}.lock", w._lock.number + 1, expires=time.time() + 600)
    with pytest.raises(CacheError, match="lost the write lease .* another writer took the lease over"):
        w.append(["cc" * 32], {"gap": np.ones((1, 4), np.float32)}, {})
    w._lock._stop.set()
    assert json.loads(fs.cat_file(f"{cache.removeprefix('memory://')}/zarr.json"))["attributes"]["rows"] == 2


def test_a_killed_extract_into_s3_is_resumed_by_the_same_command(s3, random_model, tmp_path):
    bucket = s3()
    data = tmp_path / "d"
    generated_images(data, 60)
    cmd = [sys.executable, "-m", "headstart.pipeline.cli", "extract", str(data), "--body", str(random_model),
           "--batch-size", "4", "--jobs", "1"]
    cache = f"{bucket}/killed.zarr"
    killed_at = kill_9_after([*cmd, "--cache", cache], cache, 24)
    assert 24 <= killed_at < 120, "the kill must land mid-run"
    with pytest.raises(CacheError, match="incomplete|no complete dataset"):
        FeatureCache(cache)
    # The killed writer's lease is still there; it ran on this machine and its process is gone, so the
    # rerun takes over at once instead of waiting for the lease to lapse.
    done = subprocess.run([*cmd, "--cache", cache], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{killed_at} reused, {120 - killed_at} computed" in done.stdout
    extract(data, random_model, tmp_path / "whole.zarr", batch_size=4, progress=False)
    same(cache, tmp_path / "whole.zarr", 120)


def test_store_mistakes_are_one_line_errors(s3, data, random_model, monkeypatch):
    out = cli("extract", data, "--body", random_model, "--cache", "s3://no-such-bucket/c.zarr", ok=False)
    assert "Error: s3://no-such-bucket/c.zarr: cannot take the writer's lock (The specified bucket does not exist)" \
        in out and "Traceback" not in out
    out = cli("extract", data, "--body", random_model, "--cache", "s3://some-bucket/", ok=False)
    assert "Error: s3://some-bucket/: name a folder inside the bucket, such as s3://some-bucket/features.zarr" in out
    out = cli("extract", "nope://photos", "--body", random_model, "--cache", "memory://c.zarr", ok=False)
    assert "Error: nope://photos: not a usable location" in out
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    fsspec.filesystem("s3").clear_instance_cache()
    try:
        out = cli("info", "s3://any-bucket/c.zarr", ok=False)
    finally:
        monkeypatch.undo()
        fsspec.filesystem("s3").clear_instance_cache()
    assert "Error: object store: NoCredentialsError" in out and "AWS_* variables" in out


def test_a_missing_chunk_in_a_store_is_found_by_listing_not_read_as_zeros(data, random_model):
    cache = f"memory://gone-{time.time_ns()}.zarr"
    extract(data, random_model, cache, batch_size=8, progress=False)
    assert "32 committed rows verified, no problems" in cli("verify", "--cache", cache)
    fsspec.filesystem("memory").rm(f"{cache.removeprefix('memory://')}/features/gap/c/1/0")
    out = cli("verify", "--cache", cache, ok=False)
    assert "features/gap rows 16-31: chunk missing" in out and "1 problems in 32 committed rows" in out
    with pytest.raises(CacheError, match=r"chunk features/gap/c/1/0 \(rows 16-31\) is missing"):
        FeatureCache(cache).features("gap")
    assert FeatureCache(cache).features("pool5").shape == (32, 512)  # the other layer is whole


def test_replace_empties_a_cache_in_a_store(data, random_model, tmp_path):
    from headstart.export import build_body, save
    from headstart.export.weights import random_weights

    other = save(build_body(random_weights(1), 32), tmp_path / "other.onnx")
    cache = f"memory://replaced-{time.time_ns()}.zarr"
    extract(data, random_model, cache, progress=False)
    with pytest.raises(CacheError, match="features of another body"):
        extract(data, other, cache, progress=False)
    extract(data, other, cache, replace=True, progress=False)
    extract(data, other, tmp_path / "fresh.zarr", progress=False)
    same(cache, tmp_path / "fresh.zarr", 32)
    assert not fsspec.filesystem("memory").exists(f"{cache.removeprefix('memory://')}.replacing")
