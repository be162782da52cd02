"""A cache whose metadata (a zarr.json) is empty, garbage or missing, as a user meets it through the CLI: one
line naming the damaged file and what to do, exit status 1, and nothing overwritten until `--replace`."""

import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import generated_images

from headstart.pipeline.cache import DamagedCacheError, FeatureCache, verify
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract

DAMAGE = {"emptied": b"", "garbage": b"\x00\x17 not json", "not a group": b'{"zarr_format": 3}', "a list": b"[1, 2]"}


def fails(*args) -> str:
    """The CLI's one-line error (exit status 1, no traceback), as a user sees it."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("Error: "), result.output
    return lines[-1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, random_model):
    root = tmp_path_factory.mktemp("damage")
    generated_images(root / "d", 6, "train")
    generated_images(root / "d", 2, "valid", seed=1)
    extract(root / "d", random_model, root / "c.zarr", batch_size=8, progress=False)
    return root


def damaged_copy(pristine, tmp_path, name: str, content: bytes):
    cache = tmp_path / "c.zarr"
    shutil.copytree(pristine / "c.zarr", cache)
    (cache / name).write_bytes(content)
    return cache


def commands(pristine, random_model, cache, tmp_path) -> dict[str, list]:
    return {"info": ["info", cache],
            "extract": ["extract", pristine / "d", "--body", random_model, "--cache", cache],
            "train": ["train", "--cache", cache, "--layer", "pool5", "--head", "logistic", "-o", tmp_path / "h.head"]}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_cache_zarr_json_is_named_with_the_remedy_and_kept(pristine, random_model, tmp_path, how):
    cache = damaged_copy(pristine, tmp_path, "zarr.json", DAMAGE[how])
    for command, args in commands(pristine, random_model, cache, tmp_path).items():
        line = fails(*args)
        assert f"{cache}/zarr.json " in line, (command, line)
        assert "empty" in line if how == "emptied" else "is damaged" in line, (command, line)
        assert "extract again with --replace" in line and "Expecting value" not in line.split("(")[0], line
        assert (cache / "zarr.json").read_bytes() == DAMAGE[how], f"{command} overwrote the damaged file"
    assert not (tmp_path / "h.head").exists()
    with pytest.raises(DamagedCacheError, match="zarr.json"):
        verify(cache)
    # The remedy the message gives works: the cache is started afresh and reads as the undamaged one.
    result = CliRunner().invoke(main, [str(a) for a in commands(pristine, random_model, cache, tmp_path)["extract"]]
                                + ["--replace"])
    assert result.exit_code == 0, result.output
    a, b = FeatureCache(cache), FeatureCache(pristine / "c.zarr")
    assert list(a.hashes) == list(b.hashes)
    np.testing.assert_array_equal(a.features("pool5"), b.features("pool5"))


@pytest.mark.parametrize("array", ["features/pool5", "status", "datasets/d/label"])
def test_a_damaged_array_zarr_json_is_named_and_verify_lists_it(pristine, random_model, tmp_path, array):
    cache = damaged_copy(pristine, tmp_path, f"{array}/zarr.json", b"")
    runs = commands(pristine, random_model, cache, tmp_path)
    if array.startswith("datasets/"):
        del runs["extract"]  # extract rewrites a dataset's index whole: it reads nothing of the old one
    for command, args in runs.items():
        line = fails(*args)
        assert f"{cache}/{array}/zarr.json is empty" in line, (command, line)
        assert f"`headstart verify --cache {cache}`" in line and "extract again with --replace" in line, line
        assert (cache / array / "zarr.json").read_bytes() == b"", f"{command} overwrote the damaged file"
    rows, problems = verify(cache)
    assert rows == 16 and problems == [f"{array}/zarr.json: empty (a crash before it reached the disk?)"]
    out = CliRunner().invoke(main, ["verify", "--cache", str(cache)])
    assert out.exit_code == 1 and f"BROKEN {array}/zarr.json: empty" in out.output


def test_a_missing_array_zarr_json_is_named(pristine, tmp_path):
    cache = damaged_copy(pristine, tmp_path, "hash/zarr.json", b"")
    (cache / "hash" / "zarr.json").unlink()
    with pytest.raises(DamagedCacheError, match=rf"{cache}/hash/zarr.json is missing; run `headstart verify"):
        _ = FeatureCache(cache).hashes
    assert verify(cache)[1] == ["hash/zarr.json: missing"]


def test_a_damaged_zarr_json_in_an_object_store_is_named_and_replace_starts_afresh(pristine, random_model):
    fsspec = pytest.importorskip("fsspec")
    cache = f"memory://damaged-{time.time_ns()}.zarr"
    extract(pristine / "d", random_model, cache, batch_size=8, progress=False)
    fs = fsspec.filesystem("memory")
    key = f"{cache.removeprefix('memory://')}/zarr.json"
    fs.pipe_file(key, b"")
    assert fails("info", cache) == (f"Error: {cache}/zarr.json is empty (a crash before it reached the disk?); the "
                                    "cache cannot be read: extract again with --replace (or into a new cache)")
    assert fs.cat_file(key) == b""
    report = extract(pristine / "d", random_model, cache, replace=True, progress=False)
    assert (report.reused, report.computed) == (0, 16) and len(FeatureCache(cache)) == 16


def test_a_bug_while_reading_features_keeps_its_exception(pristine, monkeypatch):
    """Only zarr's read of a chunk is taken for damage; an error of our own around it is a bug, not a CacheError."""
    cache = FeatureCache(pristine / "c.zarr")

    def broken(*_):
        raise ValueError("a bug in our code")

    monkeypatch.setattr(FeatureCache, "_check_chunks", broken)
    with pytest.raises(ValueError, match="a bug in our code") as caught:
        cache.features("pool5")
    assert not isinstance(caught.value, DamagedCacheError) and type(caught.value) is ValueError
