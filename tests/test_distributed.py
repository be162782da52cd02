"""Extraction on a Dask LocalCluster of 2 worker processes: the same arrays as one process, through faults."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import committed_rows, generated_images, kill_9_after

from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.distributed import blocks
from headstart.pipeline.extract import extract

distributed = pytest.importorskip("distributed", reason="the dask extra: pip install 'headstart[dask]'")


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
            Client(c) as client:
        yield client


@pytest.fixture(scope="module")
def photos(tmp_path_factory, random_model):
    root = tmp_path_factory.mktemp("dask")
    generated_images(root / "d", 60, "train")
    generated_images(root / "d", 20, "valid", seed=1)
    extract(root / "d", random_model, root / "single.zarr", batch_size=16, progress=False)
    return root


def same(a, b, check_paths=True):
    a, b = FeatureCache(a), FeatureCache(b)
    assert list(a.hashes) == list(b.hashes) and len(a) == 160
    assert not check_paths or list(a.paths) == list(b.paths)
    for layer in ("gap", "pool5"):
        np.testing.assert_array_equal(a.features(layer), b.features(layer))


def test_blocks_fill_chunks_of_their_own():
    assert blocks(0, 40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert blocks(10, 30, 16) == [(10, 16), (16, 32), (32, 40)]


def test_a_cluster_extracts_what_one_process_does(photos, random_model, cluster, tmp_path):
    report = extract(photos / "d", random_model, tmp_path / "c.zarr", batch_size=16, client=cluster, progress=False)
    assert (report.computed, report.reused) == (160, 0)
    same(photos / "single.zarr", tmp_path / "c.zarr")
    pids = {p for p in cluster.run(os.getpid).values()}
    assert len(pids) == 2 and os.getpid() not in pids  # the body ran in worker processes


def test_a_file_changed_between_hashing_and_decoding_is_recorded_on_a_cluster_too(random_model, cluster, tmp_path,
                                                                                  monkeypatch):
    import headstart.pipeline.distributed as distributed_module
    from headstart.pipeline.extract import CHANGED

    generated_images(tmp_path / "d", 6, "train")
    victim = sorted((tmp_path / "d" / "train" / "a").iterdir())[0]
    other = generated_images(tmp_path / "other", 1, classes=("z",), seed=7)[0]
    real = distributed_module.compute

    def swap_then_compute(*args, **kwargs):
        shutil.copy(other, victim)  # after the workers hashed it, before they decode it
        return real(*args, **kwargs)

    monkeypatch.setattr(distributed_module, "compute", swap_then_compute)
    report = extract(tmp_path / "d", random_model, tmp_path / "c.zarr", batch_size=4, client=cluster, progress=False)
    fc = FeatureCache(tmp_path / "c.zarr")
    assert report.skipped == 1 and [s["reason"] for s in fc.skipped] == [CHANGED]
    assert str(victim) not in set(fc.paths) and len(fc) == 11  # the dataset is written without its row
    monkeypatch.setattr(distributed_module, "compute", real)
    again = extract(tmp_path / "d", random_model, tmp_path / "c.zarr", batch_size=4, client=cluster, progress=False)
    assert (again.computed, again.skipped) == (1, 0) and len(FeatureCache(tmp_path / "c.zarr")) == 12


def test_a_cluster_reads_images_from_and_writes_features_to_s3(photos, random_model, cluster, s3):
    import fsspec

    env = s3.env
    cluster.run(lambda: os.environ.update(env))  # the workers were started before the S3 server
    bucket = s3()
    fsspec.filesystem("s3").put(str(photos / "d"), f"{bucket}/d", recursive=True)
    report = extract(f"{bucket}/d", random_model, f"{bucket}/c.zarr", batch_size=16, client=cluster, progress=False)
    assert (report.computed, report.reused) == (160, 0)
    same(photos / "single.zarr", f"{bucket}/c.zarr", check_paths=False)
    with pytest.raises(ValueError, match="memory:// store lives in one process"):
        extract(photos / "d", random_model, "memory://c.zarr", client=cluster, progress=False)


def test_workers_that_declare_gpus_get_one_block_per_gpu(photos, random_model, cluster, tmp_path):
    from distributed import Client, LocalCluster

    from headstart.pipeline.distributed import gpu_resources

    assert gpu_resources(cluster) is None
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                      resources={"GPU": 1}) as c, Client(c) as client:
        assert gpu_resources(client) == {"GPU": 1}
        extract(photos / "d", random_model, tmp_path / "c.zarr", batch_size=16, client=client, progress=False)
    same(photos / "single.zarr", tmp_path / "c.zarr")


def test_a_worker_killed_mid_run_has_its_block_recomputed(photos, random_model, cluster, tmp_path):
    cache = tmp_path / "c.zarr"
    victim = next(iter(cluster.run(os.getpid).values()))
    killer = threading.Thread(target=lambda: (_wait_rows(cache, 16), os.kill(victim, signal.SIGKILL)))
    killer.start()
    extract(photos / "d", random_model, cache, batch_size=16, client=cluster, progress=False)
    killer.join()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    same(photos / "single.zarr", cache)


def _wait_rows(cache, rows):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ((cache / "zarr.json").exists() and committed_rows(cache) >= rows):
        time.sleep(0.005)


def test_a_killed_client_is_resumed_by_the_same_command(photos, random_model, tmp_path):
    cache = tmp_path / "c.zarr"
    cmd = [sys.executable, "-m", "headstart.pipeline.cli", "extract", str(photos / "d"), "--body",
           str(random_model), "--cache", str(cache), "--batch-size", "16", "--dask", "local:2"]
    killed_at = kill_9_after(cmd, cache, 16, group=True)
    assert 16 <= killed_at < 160, "the kill must land mid-run"
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert f"{killed_at} reused, {160 - killed_at} computed" in done.stdout
    same(photos / "single.zarr", cache)


def test_predict_on_a_cluster_writes_the_same_rows(photos, random_model, cluster, tmp_path):
    from headstart.export import save
    from headstart.heads import save_head
    from headstart.heads.bundle import bundle_files
    from headstart.pipeline.distributed import predict_on
    from headstart.pipeline.predict import predict
    from headstart.pipeline.train import train_head

    head = save_head(train_head(photos / "single.zarr", "gap", "logistic"), tmp_path / "h.head")
    model = save(bundle_files(random_model, head), tmp_path / "m.onnx")
    (photos / "d" / "train" / "a" / "broken.jpg").write_bytes(b"")
    try:
        here = list(predict(photos / "d", model, quiet=True))
        there = list(predict_on(cluster, photos / "d", model, block=50))
    finally:
        (photos / "d" / "train" / "a" / "broken.jpg").unlink()
    assert len(there) == 161 and [r["path"] for r in there] == [r["path"] for r in here]
    assert there == here and sum(bool(r["error"]) for r in there) == 1
