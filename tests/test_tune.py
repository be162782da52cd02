"""Fine-tuning block 5 from cached pool4: it learns, beats a random-init control, and bundles exactly."""

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import allow_real_photos, link_photos, photos, pixels

from headstart.export import build_body, open_session, save
from headstart.heads import load_head
from headstart.heads.bundle import bundle_files
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.tune import to_torch, tune_head


@pytest.fixture(scope="module")
def tune_cache(real_weights, tmp_path_factory):
    allow_real_photos()
    root = tmp_path_factory.mktemp("tune")
    model = save(build_body(real_weights, 64, ("pool4", "gap", "pool5")), root / "vgg16-64.onnx")
    data = link_photos(photos("train", 150), root / "catsdogs", "train")
    link_photos(photos("valid", 50), data, "valid")
    extract(data, model, root / "c.zarr", dtype="float32", progress=False)
    return root / "c.zarr", model


@pytest.mark.slow
def test_tuning_learns_and_beats_a_random_init_control(tune_cache):
    cache, model = tune_cache
    tuned = tune_head(cache, model, unfreeze=1, epochs=6)
    losses = [r["train_loss"] for r in tuned.history_]
    assert losses[-1] < losses[0] and len(losses) == 6
    control = tune_head(cache, model, unfreeze=1, epochs=6, random_init=True)
    a, b = tuned.meta_["metrics"], control.meta_["metrics"]
    assert a["valid_accuracy"] >= 0.85 and a["valid_accuracy"] > b["valid_accuracy"], (a, b)
    assert a["valid_loss"] < b["valid_loss"], (a, b)


@pytest.mark.slow
def test_a_tuned_head_bundles_to_the_torch_model_and_evaluates(tune_cache, tmp_path):
    import torch

    cache, model = tune_cache
    out = CliRunner().invoke(main, ["tune", "--cache", str(cache), "--body", str(model), "--unfreeze", "3",
                                    "--pooling", "flatten", "--head", "mlp", "--hidden", "32", "--epochs", "2",
                                    "-o", str(tmp_path / "t.head")])
    assert out.exit_code == 0, out.output
    assert "tuning conv5_1..conv5_3 on cached pool4" in out.output and out.output.count("valid loss") == 2
    head = load_head(tmp_path / "t.head")
    assert head.get_params() == {"unfreeze": 3, "pooling": "flatten", "hidden": (32,)}
    x = pixels(photos("valid", 4), 64)
    got = open_session(bundle_files(model, tmp_path / "t.head").SerializeToString(), quiet=True).run(
        ["probabilities"], {"images": x})[0]
    pool4 = open_session(model, quiet=True).run(["pool4"], {"images": x})[0]
    with torch.no_grad():
        want = torch.softmax(to_torch(head)(torch.from_numpy(pool4)), 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    ev = CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--head-file", str(tmp_path / "t.head")])
    assert ev.exit_code == 0, ev.output
    assert "TunedHead on pool4, valid: accuracy" in ev.output and "on 100 rows" in ev.output, ev.output


def test_tune_without_torch_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    out = CliRunner().invoke(main, ["tune", "--cache", str(tmp_path), "-o", str(tmp_path / "t.head")])
    assert out.exit_code == 1 and "pip install 'headstart[tune]'" in out.output
