"""Sweeps on one cache: every combination trained as `headstart train` would, sorted by accuracy."""

import json

import numpy as np
from click.testing import CliRunner
from helpers import generated_images

from headstart.heads import load_head
from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.sweep import sweep, trials
from headstart.pipeline.train import train_head


def test_each_head_gets_only_the_parameters_it_takes():
    plan = trials(["gap"], ["softmax", "logistic"], {"l2": [1e-3, 1e-2], "lr": [1e-3, 1e-2], "epochs": []})
    assert len([t for t in plan if t[1] == "softmax"]) == 4
    assert [t[2] for t in plan if t[1] == "logistic"] == [{"l2": 1e-3}, {"l2": 1e-2}]


def test_the_sweeps_best_equals_the_same_single_train(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 16, "train", ("a", "b", "c"))
    generated_images(data, 6, "valid", ("a", "b", "c"), seed=1)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, progress=False)
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--layers", "gap,pool5",
                                       "--heads", "softmax,logistic", "--l2", "1e-3,1e-1", "--lr", "1e-3,1e-2",
                                       "--json", str(tmp_path / "s.json"), "--save-best", str(tmp_path / "b.head")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "s.json").read_text())
    assert len(rows) == 2 * (4 + 2)
    accuracy = [r["select_accuracy"] for r in rows]
    assert accuracy == sorted(accuracy, reverse=True) and all(r["seconds"] > 0 for r in rows)
    best = rows[0]
    single = train_head(cache, best["layer"], best["head"], **best["params"])
    assert single.meta_["metrics"]["valid_accuracy"] == best["valid_accuracy"]
    saved = load_head(tmp_path / "b.head")
    X = FeatureCache(cache).features(best["layer"])
    np.testing.assert_allclose(saved.predict_proba(X), single.predict_proba(X), atol=1e-6)
    assert "| layer | head | params | select_accuracy | select_loss | valid_accuracy | valid_95" in result.output
    assert all(r["valid_low"] <= r["valid_accuracy"] <= r["valid_high"] for r in rows)
    assert f"[{rows[0]['valid_low']:.3f}, {rows[0]['valid_high']:.3f}]" in result.output
    assert "best:" in result.output and "not used to rank" in result.output


def test_the_sweep_ranks_without_reading_the_validation_rows(tmp_path, random_model):
    """The same training images beside honest and poisoned (mislabelled) validation images: the same ranking."""
    caches = []
    for name, classes in (("honest", ("a", "b", "c")), ("poisoned", ("b", "c", "a"))):
        data = tmp_path / name
        generated_images(data, 14, "train", ("a", "b", "c"))
        generated_images(data, 6, "valid", ("a", "b", "c"), seed=1)
        for folder, label in zip(("a", "b", "c"), classes, strict=True):  # valid images under another label
            (data / "valid" / folder).rename(data / "valid" / f"_{label}")
        for label in classes:
            (data / "valid" / f"_{label}").rename(data / "valid" / label)
        extract(data, random_model, tmp_path / f"{name}.zarr", progress=False)
        caches.append(tmp_path / f"{name}.zarr")
    grid = {"l2": [1e-4, 1e-2, 1.0], "lr": [], "epochs": [5]}
    honest, best_h = sweep(caches[0], ["gap"], ["logistic", "softmax", "knn"], grid)
    poisoned, best_p = sweep(caches[1], ["gap"], ["logistic", "softmax", "knn"], grid)
    key = ["layer", "head", "params", "select_accuracy", "select_loss"]
    assert [[r[k] for k in key] for r in honest] == [[r[k] for k in key] for r in poisoned]
    assert [r["valid_accuracy"] for r in honest] != [r["valid_accuracy"] for r in poisoned]
    X = FeatureCache(caches[0]).features("gap")
    np.testing.assert_allclose(best_h.predict_proba(X), best_p.predict_proba(X), atol=1e-6)
    named, _ = sweep(caches[1], ["gap"], ["logistic"], grid, select_on="valid")  # the user's own choice of rows
    assert [r["select_accuracy"] for r in named] == [r["valid_accuracy"] for r in named]
