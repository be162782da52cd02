"""Augmented views, cached: keys from content and spec, reuse, raising K, resume after kill -9, training."""

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import generated_images, kill_9_after

from headstart.export import open_session
from headstart.pipeline.augment import view_key, view_spec
from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.decode import decode
from headstart.pipeline.extract import extract


def test_views_are_seeded_by_content_and_number():
    a, b = view_spec("ab" * 32, 0), view_spec("ab" * 32, 1)
    assert a == view_spec("ab" * 32, 0) and a != b and a != view_spec("cd" * 32, 0)
    x0, y0, x1, y1 = a["crop"]
    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and 0.8 <= a["brightness"] <= 1.2
    assert view_key("ab" * 32, a) not in ("ab" * 32, view_key("ab" * 32, b))


def test_views_are_rows_reused_by_content_and_raising_k_computes_only_new_ones(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 3)
    cache = tmp_path / "c.zarr"
    first = extract(data, random_model, cache, augment=2, dtype="float32", progress=False)
    assert (first.files, first.reused, first.computed) == (6, 0, 18)
    fc = FeatureCache(cache)
    assert fc.view_rows.shape == (6, 2) and (fc.view_rows >= 0).all() and fc.rows == 18
    assert not set(fc.view_rows.ravel()) & set(fc.entry_rows)
    # A view's features are the body's on that view of the file's bytes.
    h, path = fc.hashes[0], fc.paths[0]
    x = decode(open(path, "rb").read(), 32, view=view_spec(h, 1))[None]
    want = open_session(random_model, quiet=True).run(["pool5"], {"images": x})[0].reshape(1, -1)
    np.testing.assert_allclose(fc.features_at("pool5", fc.view_rows[:1, 1]), want, rtol=1e-6)
    assert not np.allclose(fc.features_at("pool5", fc.view_rows[:1, 1]), fc.features("pool5", [0]))
    again = extract(data, random_model, cache, augment=2, dtype="float32", progress=False)
    assert (again.reused, again.computed) == (18, 0)
    more = extract(data, random_model, cache, augment=3, dtype="float32", progress=False)
    assert (more.reused, more.computed) == (18, 6)
    fc3 = FeatureCache(cache)
    np.testing.assert_array_equal(fc3.view_rows[:, :2], fc.view_rows)


def test_kill_9_while_computing_views_then_resume_equals_an_uninterrupted_run(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 40)
    cmd = [sys.executable, "-m", "headstart.pipeline.cli", "extract", str(data), "--body", str(random_model),
           "--batch-size", "4", "--jobs", "1", "--augment", "2"]
    subprocess.run([*cmd, "--cache", str(tmp_path / "whole.zarr")], check=True, capture_output=True)
    cache = tmp_path / "killed.zarr"
    killed_at = kill_9_after([*cmd, "--cache", str(cache)], cache, 100)
    assert 100 <= killed_at < 240, "the kill must land while views are computed"
    done = subprocess.run([*cmd, "--cache", str(cache)], check=True, capture_output=True, text=True)
    assert f"{killed_at} reused, {240 - killed_at} computed" in done.stdout
    a, b = FeatureCache(tmp_path / "whole.zarr"), FeatureCache(cache)
    assert list(a.hashes) == list(b.hashes)
    for layer in ("gap", "pool5"):
        np.testing.assert_array_equal(a.features(layer), b.features(layer))
        for k in range(2):
            np.testing.assert_array_equal(a.features_at(layer, a.view_rows[:, k]),
                                          b.features_at(layer, b.view_rows[:, k]))


def test_train_on_augmented_views(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 8, "train")
    generated_images(data, 3, "valid", seed=1)
    plain = tmp_path / "plain.zarr"
    extract(data, random_model, plain, progress=False)
    out = CliRunner().invoke(main, ["train", "--cache", str(plain), "--augmented", "-o", str(tmp_path / "h.head")])
    assert out.exit_code == 1 and "has no augmented views; extract it with --augment K" in out.output
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, augment=4, progress=False)
    out = CliRunner().invoke(main, ["train", "--cache", str(cache), "--augmented", "--head", "softmax", "--epochs", "5",
                                    "-o", str(tmp_path / "h.head")])
    assert out.exit_code == 0, out.output
    assert "each epoch draws one of 5 cached views of every training image" in out.output
    assert out.output.count("valid loss") == 5 and "16 train / 6 valid rows" in out.output
    refused = CliRunner().invoke(main, ["train", "--cache", str(cache), "--augmented", "--head", "logistic",
                                        "-o", str(tmp_path / "l.head")])
    assert refused.exit_code == 1 and "--augmented needs a head trained by epochs" in refused.output


@pytest.mark.parametrize("k", [-1])
def test_a_negative_number_of_views_is_refused(tmp_path, random_model, k):
    generated_images(tmp_path / "d", 1)
    out = CliRunner().invoke(main, ["extract", str(tmp_path / "d"), "--body", str(random_model),
                                    "--cache", str(tmp_path / "c.zarr"), "--augment", str(k)])
    assert out.exit_code == 2 and "--augment" in out.output
