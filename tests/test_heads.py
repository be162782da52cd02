import json

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner
from helpers import link_photos, photos, run_head_graph

from headstart.heads import KNNHead, LogisticHead, MLPHead, SoftmaxHead, load_head, save_head
from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.train import train_head


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["softmax", "logistic", "mlp"])
@pytest.mark.parametrize("layer", ["gap", "pool5"])
def test_every_head_separates_cats_from_dogs(photo_cache, kind, layer):
    head = train_head(photo_cache, layer, kind)
    assert head.meta_["rows"] == {"train": 800, "valid": 200}
    assert head.meta_["metrics"]["valid_accuracy"] >= 0.92, head.meta_["metrics"]


@pytest.mark.slow
def test_cli_logs_every_epoch_and_evaluate_writes_reports(photo_cache, tmp_path):
    out = tmp_path / "h.head"
    result = CliRunner().invoke(main, ["train", "--cache", str(photo_cache), "--layer", "gap", "--head", "softmax",
                                       "--epochs", "5",
                                       "-o", str(out), "--history", str(tmp_path / "hist.json")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    epochs = [x for x in lines if x.startswith("epoch")]
    assert len(epochs) == 5 and all("valid loss" in x and x.endswith(" ms") for x in epochs)
    assert lines[-1].startswith("catsdogs: softmax head on gap (512 features, 2 classes), 800 train / 200 valid")
    assert len(json.loads((tmp_path / "hist.json").read_text())) == 5

    args = ["evaluate", "--cache", str(photo_cache), "--head-file", str(out), "--metrics", str(tmp_path / "m.json"),
            "--details", str(tmp_path / "d.json"), "--confusion", str(tmp_path / "cm.csv"),
            "--plot", str(tmp_path / "cm.png")]
    result = CliRunner().invoke(main, [*args, "--json", "-"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert printed["accuracy"] == saved["accuracy"] == pytest.approx(load_head(out).meta_["metrics"]["valid_accuracy"])
    cm = np.array(printed["confusion_matrix"])
    assert cm.sum() == 200 and cm.trace() / 200 == pytest.approx(printed["accuracy"])
    assert set(saved) == {"accuracy", "log_loss", "n"} and 0 < saved["log_loss"] < 1 and saved["n"] == 200
    details = json.loads((tmp_path / "d.json").read_text())
    assert details == printed and set(details["per_class"]) == {"cats", "dogs"}
    assert sum(c["support"] for c in details["per_class"].values()) == 200
    rows = (tmp_path / "cm.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 201
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_tasks_from_one_cache_without_onnxruntime(photo_cache, tmp_path, monkeypatch):
    real = onnxruntime.InferenceSession

    def no_body(model, *args, **kwargs):
        """Only the heads' own one-op graphs (Gather and Cast: float16 rows to float32; Gemm: a product) may run;
        no body."""
        ops = [n.op_type for n in onnx.load_from_string(model).graph.node] if isinstance(model, bytes) else None
        if ops not in (["Gather", "Cast"], ["Gemm"]):
            raise AssertionError(f"onnxruntime ran a model ({ops or model}) while training heads on cached features")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_body)
    (tmp_path / "map.yaml").write_text("cats: feline\ndogs: canine\n")
    runner = CliRunner()
    for args in (["--task", "catsdogs"], ["--task", "family", "--classes-map", str(tmp_path / "map.yaml")]):
        result = runner.invoke(main, ["train", "--cache", str(photo_cache), "--head", "logistic",
                                      "-o", str(tmp_path / f"{args[1]}.head"), *args])
        assert result.exit_code == 0, result.output
    a, b = load_head(tmp_path / "catsdogs.head"), load_head(tmp_path / "family.head")
    assert a.classes_.tolist() == ["cats", "dogs"] and b.classes_.tolist() == ["canine", "feline"]
    X = FeatureCache(photo_cache).features("gap")[:50]
    # The same optimum with the classes swapped: cat probability of one is feline probability of the other.
    np.testing.assert_allclose(a.predict_proba(X)[:, 0], b.predict_proba(X)[:, 1], atol=1e-4)


@pytest.mark.slow
def test_head_file_is_plain_npz_and_round_trips(photo_cache, tmp_path):
    head = train_head(photo_cache, "gap", "mlp", hidden=(32, 16), epochs=3)
    path = save_head(head, tmp_path / "mlp.head")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["W0", "W1", "W2", "b0", "b1", "b2", "mean", "meta", "scale"]
    loaded = load_head(path)
    X = FeatureCache(photo_cache).features("gap")
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert loaded.meta_["fingerprint"]["image_size"] == 96 and loaded.meta_["layer"] == "gap"
    assert type(loaded) is MLPHead and loaded.get_params() == head.get_params()


@pytest.mark.slow
def test_head_on_features_of_another_model_is_refused(photo_cache, tiny_model, tmp_path):
    head = save_head(train_head(photo_cache, "gap", "logistic"), tmp_path / "h.head")
    other = tmp_path / "other.zarr"
    extract(link_photos(photos("valid", 3), tmp_path / "d", "valid"), tiny_model, other, name="catsdogs",
            progress=False)
    result = CliRunner().invoke(main, ["evaluate", "--cache", str(other), "--head-file", str(head)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{other} holds features of another body or setting: image_size 32 (expected 96)" in result.output


@pytest.mark.slow
def test_valid_fraction_when_the_cache_has_no_valid_split(photo_cache, tmp_path):
    head = train_head(photo_cache, "gap", "logistic", valid_split="none", valid_fraction=0.25, seed=3)
    rows = head.meta_["rows"]
    assert rows["train"] + rows["valid"] == 800 and 170 <= rows["valid"] <= 230  # a quarter, chosen by hash
    from headstart.pipeline.train import evaluate

    result, y, _, _ = evaluate(photo_cache, head)
    assert result["n"] == rows["valid"] and min(np.bincount(y)) >= 70  # both classes held out
    assert result["accuracy"] == pytest.approx(head.meta_["metrics"]["valid_accuracy"])
    other = train_head(photo_cache, "gap", "logistic", valid_split="none", valid_fraction=0.25, seed=4)
    assert other.meta_["rows"] != rows  # the seed salts the choice


def test_estimators_validate_inputs_and_learn_a_known_rule():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 5)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int) + (X[:, 2] > 1).astype(int)  # 3 classes
    for head in (SoftmaxHead(epochs=50, lr=0.01), LogisticHead(l2=1e-4),
                 MLPHead(hidden=(16,), dropout=0.1, epochs=50, lr=0.01)):
        p = head.fit(X[:500], y[:500]).predict_proba(X[500:])
        assert p.shape == (100, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
        assert head.score(X[500:], y[500:]) > 0.75, type(head).__name__  # chance is about 0.45
    with pytest.raises(ValueError, match="Expected 2D array"):
        SoftmaxHead().fit(np.zeros((3,)), np.zeros(3, int))
    with pytest.raises(ValueError, match="Unknown label type"):
        SoftmaxHead().fit(np.zeros((3, 2), np.float32), np.array([0.5, 1.5, 2.5]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        SoftmaxHead().fit(np.zeros((3, 2), np.float32), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"validation labels hold \[7\]"):
        SoftmaxHead().fit(X[:10], y[:10] * 0 + np.arange(10) % 2, X_valid=X[:2], y_valid=np.array([0, 7]))
    with pytest.raises(ValueError, match="need hidden sizes >= 1, 0 <= dropout < 1"):
        MLPHead(dropout=1.0).fit(X, y)


def test_softmax_head_reaches_the_logistic_optimum():
    """Minibatch descent on Dense(softmax) and lbfgs minimise the same objective: they must agree."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 8)).astype(np.float32)
    # Three classes: lbfgs is multinomial there, the very parameterisation of Dense(3, softmax).
    y = (X @ rng.standard_normal((8, 3)) + 0.5 * rng.standard_normal((400, 3))).argmax(1)
    exact = LogisticHead(l2=1e-2).fit(X, y).predict_proba(X)
    sgd = SoftmaxHead(epochs=1000, lr=0.01, batch_size=400, l2=1e-2).fit(X, y).predict_proba(X)
    assert np.abs(exact - sgd).max() < 0.01


@pytest.mark.slow
def test_grid_search_and_a_pca_pipeline_over_a_head_on_cached_photos(photo_cache):
    from sklearn.decomposition import PCA
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline

    fc = FeatureCache(photo_cache)
    tr, va = fc.select("train"), fc.select("valid")
    X, y = fc.features("gap", tr), np.array(fc.classes)[fc.labels[tr]]
    search = GridSearchCV(LogisticHead(), {"l2": [1e-3, 1e-2, 1e-1]}, cv=3).fit(X, y)
    assert search.best_params_["l2"] in (1e-3, 1e-2, 1e-1) and len(search.cv_results_["mean_test_score"]) == 3
    y_valid = np.array(fc.classes)[fc.labels[va]]
    assert search.score(fc.features("gap", va), y_valid) >= 0.9
    pipe = make_pipeline(PCA(32, random_state=0), SoftmaxHead(epochs=30, lr=0.01)).fit(X, y)
    assert pipe.predict(fc.features("gap", va)).dtype.kind == "U" and pipe.score(fc.features("gap", va), y_valid) >= 0.9


@pytest.mark.slow
def test_evaluate_shows_the_most_confident_errors(photo_cache, tmp_path):
    head = save_head(train_head(photo_cache, "gap", "softmax", epochs=5), tmp_path / "h.head")
    result = CliRunner().invoke(main, ["evaluate", "--cache", str(photo_cache), "--head-file", str(head),
                                       "--errors", "4", "--errors-plot", str(tmp_path / "e.png"),
                                       "--errors-csv", str(tmp_path / "e.csv")])
    assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.DictReader(open(tmp_path / "e.csv")))
    assert len(rows) == 4 and all(r["actual"] != r["predicted"] for r in rows)
    p = [float(r["probability"]) for r in rows]
    assert p == sorted(p, reverse=True) and p[-1] > 0.5
    valid = set(FeatureCache(photo_cache).paths[FeatureCache(photo_cache).select("valid")])
    assert {r["path"] for r in rows} <= valid and result.output.count("  wrong: ") == 4
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_compiled_softmax_step_scores_as_numpy_does_on_the_photos(photo_cache, monkeypatch):
    """The compiled softmax step, forced on (the 96 px photos' pool5 is below its threshold), trains the same
    head as numpy's path on real features: validation accuracy within one photo, probabilities within 1e-3.
    Batches of 50: each core's share of 25 rows ends in a group of fewer than 4."""
    from headstart.heads import kernels, training

    numpy_path = train_head(photo_cache, "pool5", "softmax", batch_size=50, min_steps=0)
    monkeypatch.setattr(training, "LARGE", 0)
    monkeypatch.setattr(training, "COMPILE_WORK", 0)
    rows, original = [], kernels.linear_rows
    monkeypatch.setattr(kernels, "linear_rows", lambda *a: (rows.append(len(a[1])), original(*a)))
    compiled = train_head(photo_cache, "pool5", "softmax", batch_size=50, min_steps=0)
    assert sum(rows) == 800 * compiled.epochs
    a, b = (h.meta_["metrics"]["valid_accuracy"] for h in (numpy_path, compiled))
    assert b >= 0.92 and abs(a - b) <= 0.005, (a, b)  # one photo at most
    fc = FeatureCache(photo_cache)
    X = fc.features("pool5", fc.select("valid"))
    np.testing.assert_allclose(compiled.predict_proba(X), numpy_path.predict_proba(X), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["softmax", "mlp"])
def test_streamed_training_reaches_the_in_memory_accuracy(photo_cache, kind):
    notes = []
    size = {"hidden": (64,)} if kind == "mlp" else {}  # the streaming is the point here, not the layer's width
    streamed = train_head(photo_cache, "pool5", kind, memory=2**20, say=notes.append, **size)
    assert any("streaming them from the cache" in n for n in notes)
    in_memory = train_head(photo_cache, "pool5", kind, **size)
    a, b = (h.meta_["metrics"]["valid_accuracy"] for h in (streamed, in_memory))
    assert a >= 0.92 and abs(a - b) <= 0.02, (a, b)


def _noisy(n, seed, d=100):
    """3 classes told apart by 3 of d features: an unpenalized fit on a few hundred rows is far too sure."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.standard_normal((n, d)).astype(np.float32)
    X[:, :3] += np.eye(3, dtype=np.float32)[y]
    return X, y


@pytest.mark.parametrize("make", [lambda c: SoftmaxHead(calibrate=c), lambda c: MLPHead(hidden=(32,), calibrate=c),
                                  lambda c: LogisticHead(l2=1e-5, calibrate=c),
                                  lambda c: KNNHead(n_neighbors=5, calibrate=c)])
def test_temperature_scaling_lowers_the_calibration_error_of_every_head_kind(make, tmp_path):
    from headstart.heads.metrics import expected_calibration_error

    X, y = _noisy(400, 0)
    Xt, yt = _noisy(2000, 1)
    plain, scaled = make("none").fit(X, y), make("temperature").fit(X, y)
    assert plain.temperature_ == 1.0 and scaled.temperature_ > 1.5  # too sure: softened
    before = expected_calibration_error(yt, plain.predict_proba(Xt))
    after = expected_calibration_error(yt, scaled.predict_proba(Xt))
    assert after < before / 2, (before, after)
    np.testing.assert_array_equal(scaled.predict(Xt), plain.predict(Xt))  # the same fit, only softened
    loaded = load_head(save_head(scaled, tmp_path / "h.head"))
    assert loaded.temperature_ == scaled.temperature_ and loaded.calibration_ == scaled.calibration_
    np.testing.assert_array_equal(loaded.predict_proba(Xt), scaled.predict_proba(Xt))
    np.testing.assert_allclose(run_head_graph(loaded, Xt[:300]), scaled.predict_proba(Xt[:300]), atol=1e-5)


def test_a_calibrated_bundle_gives_the_heads_probabilities(tmp_path, random_model):
    from helpers import generated_images, pixels

    from headstart.heads.bundle import bundle

    data = tmp_path / "d"
    generated_images(data, 30, "train")
    valid = generated_images(data, 5, "valid", seed=1)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, dtype="float32", progress=False)
    head = train_head(cache, "gap", "knn", calibrate="temperature")
    assert head.calibration_["rows"] == 60 and head.temperature_ != 1.0
    fc = FeatureCache(cache)
    rows = np.flatnonzero(fc.splits == "valid")
    want = head.predict_proba(fc.features("gap", rows))
    order = {str(p): i for i, p in enumerate(fc.paths[rows])}
    images = pixels(sorted(valid, key=lambda p: order[str(p)]), 32)
    session = onnxruntime.InferenceSession(bundle(random_model, head).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["probabilities"], {"images": images})[0], want, atol=1e-5)


def test_early_stopping_keeps_the_best_epoch_on_rows_held_out_by_content():
    from headstart.heads.metrics import loss_and_accuracy
    from headstart.heads.training import InMemory

    X, y = _noisy(1000, 2)
    head = MLPHead(hidden=(64,), dropout=0.0, epochs=40, lr=0.01, patience=3).fit(X, y)
    last = head.history_[-1]
    assert last["stopped_early"] and head.stopped_early_ and len(head.history_) < 40
    assert last["best_epoch"] == head.best_epoch_ == len(head.history_) - 3
    losses = [r["holdout_loss"] for r in head.history_]
    assert min(losses) == losses[head.best_epoch_ - 1]
    hashes = InMemory(X).hashes(len(X))
    order = np.random.default_rng(0).permutation(len(X))  # by content, not position: the same rows in any order
    np.testing.assert_array_equal(InMemory(X[order]).hashes(len(X)), hashes[order])
    X16 = X.astype(np.float16)
    np.testing.assert_array_equal(InMemory(X16).hashes(len(X)), InMemory(X16.astype(np.float32)).hashes(len(X)))
    held = hashes < head.validation_fraction
    assert 50 < held.sum() < 150
    kept = loss_and_accuracy(y[held], head.predict_proba(X[held]))[0]
    assert kept == pytest.approx(losses[head.best_epoch_ - 1], rel=1e-5)  # the best epoch's weights, restored
    plain = MLPHead(hidden=(64,), dropout=0.0, epochs=5, lr=0.01).fit(X, y)
    assert len(plain.history_) == 5 and "holdout_loss" not in plain.history_[-1]


def test_training_takes_at_least_min_steps_whatever_the_rows(monkeypatch):
    import headstart.heads.optimizers as optimizers

    steps, step = [], optimizers.Adam.step
    monkeypatch.setattr(optimizers.Adam, "step", lambda self, lr: (steps.append(1), step(self, lr)))
    X, y = _noisy(1000, 3, d=10)
    for rows, passes in ((8, 100), (1000, 7)):  # 1 step a pass; 16 steps a pass
        steps.clear()
        head = SoftmaxHead().fit(X[:rows], y[:rows])
        assert len(head.history_) == 20 and head.history_[-1]["passes"] == passes
        assert len(steps) == 20 * passes * -(-rows // 64) >= 2000
    steps.clear()
    head = SoftmaxHead(min_steps=0).fit(X[:8], y[:8])
    assert len(steps) == 20 and "passes" not in head.history_[-1]
    assert SoftmaxHead().fit(X[:8], y[:8]).score(X[:8], y[:8]) == 1.0  # 8 rows converge
