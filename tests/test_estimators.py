"""Heads as scikit-learn estimators, their files, and the one fingerprint check (hermetic: random weights)."""

import json
import multiprocessing

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import generated_images
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import headstart.heads.compute as compute
import headstart.heads.optimizers as optimizers
import headstart.heads.training as training
from headstart.heads import KINDS, HeadFileError, LogisticHead, MLPHead, SoftmaxHead, load_head, save_head
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.train import train_head


def blobs(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = (rng.standard_normal((n, d)) + 2.0 * np.eye(3, d)[y]).astype(np.float32)
    return X, np.array(["cat", "dog", "fox"])[y]


DENSE = [SoftmaxHead, LogisticHead, MLPHead]  # the heads with an l2 penalty and standardization (knn, auto: test_auto)


@pytest.mark.parametrize("cls", DENSE)
def test_heads_follow_the_estimator_contract(cls):
    X, y = blobs()
    head = cls(random_state=3)
    with pytest.raises(NotFittedError):
        head.predict(X)
    params = head.get_params()
    assert params["random_state"] == 3 and clone(head).get_params() == params
    head.set_params(l2=0.002, **({"lr": 0.01} if "lr" in params else {}))
    assert head.fit(X, y) is head
    assert head.classes_.tolist() == ["cat", "dog", "fox"] and head.n_features_in_ == 6
    assert set(head.predict(X)) <= set(head.classes_) and head.predict_proba(X).shape == (300, 3)
    assert head.score(X, y) > 0.8
    fresh = clone(head)
    assert not hasattr(fresh, "classes_") and fresh.get_params()["l2"] == 0.002
    with pytest.raises(ValueError, match="6 features"):
        head.predict(X[:, :4])


def test_float16_features_stay_float16_and_match_float32():
    X, y = blobs()
    a = SoftmaxHead(epochs=5).fit(X, y)
    b = SoftmaxHead(epochs=5).fit(X.astype(np.float16), y)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=2e-2)


@pytest.mark.parametrize("batch", ["small", "large"])
@pytest.mark.parametrize("hidden", [(), (3,), (300,)])
def test_float16_batches_widened_by_onnxruntime_train_exactly_as_float32(hidden, batch, monkeypatch):
    """float16 minibatches are gathered and widened by onnxruntime (or the compiled softmax step), float32 ones
    by numpy: widening is exact, so the two must train the same weights, bit for bit, with the standardization
    folded into the first layer (() and (3,): narrower than the batch) or applied to the batch ((300,)), and the
    first layer's products in numpy (a small batch) or onnxruntime or the compiled step (a large one)."""
    if batch == "large":
        monkeypatch.setattr(training, "LARGE", 0)
        monkeypatch.setattr(training, "COMPILE_WORK", 0)
    X, y = blobs(n=500, d=40)
    X16 = (X * 3).astype(np.float16)
    a = MLPHead(hidden=hidden, dropout=0.0, epochs=3, min_steps=0).fit(X16, y)
    b = MLPHead(hidden=hidden, dropout=0.0, epochs=3, min_steps=0).fit(X16.astype(np.float32), y)
    for (Wa, ba), (Wb, bb) in zip(a.layers_, b.layers_, strict=True):
        np.testing.assert_array_equal(Wa, Wb)
        np.testing.assert_array_equal(ba, bb)


@pytest.mark.parametrize("class_weight", [None, "balanced"])
@pytest.mark.parametrize("hidden", [(), (3,), (300,)])
def test_large_batches_train_as_small_ones_do(hidden, class_weight, monkeypatch):
    """A large batch's first layer goes to onnxruntime's products, or with no hidden layer, to the compiled
    softmax step, its rows shared among threads; a small one's stays in numpy. The weights must agree."""
    X, y = blobs(n=500, d=40)
    y[:300] = "cat"  # unbalanced, so that class weights matter
    small = MLPHead(hidden=hidden, dropout=0.5, epochs=3, min_steps=0, class_weight=class_weight).fit(X, y)
    monkeypatch.setattr(training, "LARGE", 0)
    monkeypatch.setattr(training, "COMPILE_WORK", 0)
    large = MLPHead(hidden=hidden, dropout=0.5, epochs=3, min_steps=0, class_weight=class_weight).fit(X, y)
    np.testing.assert_allclose(small.history_[-1]["train_loss"], large.history_[-1]["train_loss"], rtol=1e-4)
    for (Wa, ba), (Wb, bb) in zip(small.layers_, large.layers_, strict=True):
        np.testing.assert_allclose(Wa, Wb, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ba, bb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("classes", [2, 5])
def test_streamed_blocks_train_the_same_in_the_compiled_step(classes, monkeypatch):
    """fit_blocks hands the compiled softmax step each block and the rows picked from it (batches of 37: groups
    of 4 rows with a remainder): the weights must agree with numpy's path over the same batches."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, classes, 600)
    X = (rng.standard_normal((600, 50)) + np.eye(classes, 50)[y]).astype(np.float16)

    def blocks(rng):
        starts = range(0, 600, 200) if rng is None else rng.permutation(3) * 200
        return ((np.arange(i, i + 200), X[i:i + 200]) for i in starts)

    numpy_path = SoftmaxHead(epochs=3, batch_size=37, min_steps=0).fit_blocks(blocks, 50, y)
    monkeypatch.setattr(training, "LARGE", 0)
    monkeypatch.setattr(training, "COMPILE_WORK", 0)
    from headstart.heads import kernels

    calls, original = [], kernels.linear_rows
    monkeypatch.setattr(kernels, "linear_rows", lambda *a: (calls.append(len(a[1])), original(*a)))
    compiled = SoftmaxHead(epochs=3, batch_size=37, min_steps=0).fit_blocks(blocks, 50, y)
    assert sum(calls) == 3 * 600  # every row of every epoch went through the compiled step
    for (Wa, ba), (Wb, bb) in zip(numpy_path.layers_, compiled.layers_, strict=True):
        np.testing.assert_allclose(Wa, Wb, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ba, bb, rtol=1e-4, atol=1e-5)


def test_float16_widens_exactly_in_the_compiled_step():
    """Every finite float16 value, as the compiled softmax step widens it, against numpy's conversion: one row
    whose logits are 0, so that its gradient is exactly -1/2 and +1/2 times the row."""
    from headstart.heads.kernels import linear_rows

    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    X = halves[np.isfinite(halves)][None]
    d = X.shape[1]
    P, G, gs = np.empty((1, 2), np.float32), np.empty((2, d), np.float32), np.empty(2, np.float32)
    linear_rows(X, np.array([0]), np.zeros((2, d), np.float32), np.zeros(2, np.float32), np.array([0]),
                np.ones(1, np.float32), -40.0, P, G, gs)
    np.testing.assert_array_equal(P, [[0.5, 0.5]])
    np.testing.assert_array_equal(G[1] * 2, X[0].astype(np.float32))
    np.testing.assert_array_equal(G[0] * -2, X[0].astype(np.float32))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shapes", [[(7, 3), (3,)], [(2, 25_088), (2,)], [(1100, 1000), (1000,), (1000, 2), (2,)]])
def test_adam_takes_the_textbook_steps(shapes, compiled):
    """Adam with an l2 term on the weights, against the paper's formulas in float64, with epsilon added to the
    uncorrected root as in Keras: for a few parameters and 50,000 (numpy, or compiled as beside the compiled
    softmax step), and 1.1M (compiled always, shared among threads)."""
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    decay = [1e-2 if i % 2 == 0 else 0.0 for i in range(len(shapes))]
    adam = optimizers.Adam(start, decay=decay, compiled=compiled)
    assert adam.compiled == (compiled or len(shapes) == 4)
    ref = [p.astype(np.float64) for p in start]
    m, v = [np.zeros_like(p) for p in ref], [np.zeros_like(p) for p in ref]
    for t in range(1, 6):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for g, into in zip(grads, adam.grads, strict=True):
            into[...] = g
        adam.step(0.01)
        for i, g in enumerate(grads):
            g = g + decay[i] * ref[i]
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            ref[i] -= 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m[i] / (np.sqrt(v[i]) + 1e-7)
    for p, r in zip(adam.params, ref, strict=True):
        np.testing.assert_allclose(p, r, rtol=1e-5, atol=1e-6)


def test_training_keeps_subnormal_floats_out_of_the_gradients(monkeypatch):
    """Confident rows' tiny probabilities are taken as 0 in training: without that, the products downstream of
    them make subnormal floats (which cost Intel CPUs a microcode assist each)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    X = (0.1 * rng.standard_normal((500, 40)) + np.eye(3, 40)[y]).astype(np.float32)  # far apart: confident
    seen = []
    step = optimizers.Adam.step

    def check(self, lr):
        g = self.g[self.g != 0]
        seen.append(int((np.abs(g) < np.finfo(np.float32).tiny).sum()))
        step(self, lr)

    monkeypatch.setattr(optimizers.Adam, "step", check)
    MLPHead(hidden=(16,), dropout=0.0, lr=0.5).fit(X, y)
    assert sum(seen) == 0
    monkeypatch.setattr(training, "FLUSH", None)
    MLPHead(hidden=(16,), dropout=0.0, lr=0.5).fit(X, y)
    assert sum(seen) > 0  # the check sees them where they are not flushed


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300])
@pytest.mark.parametrize("cls", DENSE)
def test_training_features_that_are_not_finite_are_named_in_one_line(cls, bad):
    X, y = blobs(n=200, d=8)
    X = X.astype(np.float64)
    X[5, 3] = X[7, 6] = bad
    message = r"NaN or infinite values \(or values beyond float32's range\) in 2 of 8 columns \(first: \[3, 6\]\)"
    with np.errstate(over="ignore"):
        X16 = X.astype(np.float16)
    for features in (X, X16):
        with pytest.raises(ValueError, match=message):
            cls().fit(features, y)
    if np.isinf(bad) or np.isnan(bad):
        with pytest.raises(ValueError, match="NaN|infinity"):  # without the statistics, scikit-learn's own check
            cls(standardize=False).fit(X, y)
    if cls is not LogisticHead:
        with pytest.raises(ValueError, match=message):
            cls().fit_blocks(lambda rng: [(np.arange(200), X)], 8, y)


def test_folding_the_standardization_into_the_weights_trains_the_standardized_model():
    """Folded (softmax: the layer is narrower than the batch) == standardizing the features beforehand."""
    X, y = blobs(n=500, d=40)
    X = X * np.linspace(0.1, 50, 40, dtype=np.float32) + 7
    folded = SoftmaxHead(epochs=3, min_steps=0).fit(X, y)
    Z = (X - folded.mean_) / folded.scale_
    plain = SoftmaxHead(epochs=3, min_steps=0, standardize=False).fit(Z, y)
    np.testing.assert_allclose(folded.layers_[0][0], plain.layers_[0][0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(folded.predict_proba(X), plain.predict_proba(Z), atol=1e-4)


@pytest.mark.parametrize("cls", list(KINDS.values()))
def test_head_file_loads_back_into_the_same_estimator(cls, tmp_path):
    X, y = blobs()
    head = cls(random_state=1).fit(X, y)
    head.meta_ = {"task": "t", "layer": "gap"}
    loaded = load_head(save_head(head, tmp_path / "h.head"))
    assert type(loaded) is cls and loaded.get_params() == head.get_params()
    assert loaded.classes_.tolist() == head.classes_.tolist() and loaded.meta_ == head.meta_
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert loaded.score(X, y) == head.score(X, y)


def _rewrite(path, out, arrays=None, meta=None):
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    m = json.loads(str(a.pop("meta")))
    m.update(meta or {})
    a.update(arrays or {})
    a = {k: v for k, v in a.items() if v is not None}
    np.savez(out, meta=np.array(json.dumps(m)), **a)
    return out


@pytest.mark.parametrize("change,message", [
    ({"arrays": {"W1": np.zeros((16, 5), np.float32)}}, "W1 is float32 (16, 5), expected finite floats of shape"),
    ({"arrays": {"b0": None}}, "arrays"),
    ({"arrays": {"extra": np.zeros(3)}}, "arrays"),
    ({"arrays": {"scale": np.zeros(6, np.float32)}}, "scale has values <= 0"),
    ({"arrays": {"mean": np.full(6, np.nan, np.float32)}}, "mean is float32 (6,)"),
    ({"meta": {"classes": ["cat", "cat", "fox"]}}, "classes must be 2 or more distinct names"),
    ({"meta": {"kind": "svm"}}, "unknown head kind 'svm'"),
    ({"meta": {"params": {"hidden": [16], "colour": 1}}}, "do not fit a mlp head"),
    ({"meta": {"n_features": 7}}, "expected finite floats of shape (7,)"),
    ({"meta": {"format": "headstart-head/1"}}, "format 'headstart-head/1'"),
])
def test_crafted_head_files_are_refused_at_load(tmp_path, change, message):
    X, y = blobs()
    good = save_head(MLPHead(hidden=(16,), epochs=2).fit(X, y), tmp_path / "good.head")
    bad = _rewrite(good, tmp_path / "bad.npz", **change)
    with pytest.raises(HeadFileError, match="not a usable head file") as e:
        load_head(bad)
    assert message in str(e.value) and str(bad) in str(e.value)
    result = CliRunner().invoke(main, ["bundle", "--head-file", str(bad), "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "not a usable head file" in result.output and "Traceback" not in result.output
    (tmp_path / "junk.head").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(HeadFileError, match="junk.head: not a usable head file"):
        load_head(tmp_path / "junk.head")


@pytest.fixture(scope="module")
def two_caches(random_model, tmp_path_factory):
    """Features of the same generated images, decoded two ways: squash and center-crop."""
    root = tmp_path_factory.mktemp("two")
    generated_images(root / "d", 12, "train")
    generated_images(root / "d", 4, "valid", seed=1)
    for resize in ("squash", "center-crop"):
        extract(root / "d", random_model, root / f"{resize}.zarr", resize=resize, progress=False)
    return root


def test_a_head_of_squash_features_is_refused_on_a_center_crop_cache(two_caches, tmp_path):
    head = save_head(train_head(two_caches / "squash.zarr", "gap", "logistic"), tmp_path / "h.head")
    ok = CliRunner().invoke(main, ["evaluate", "--cache", str(two_caches / "squash.zarr"), "--head-file", str(head)])
    assert ok.exit_code == 0, ok.output
    other = two_caches / "center-crop.zarr"
    result = CliRunner().invoke(main, ["evaluate", "--cache", str(other), "--head-file", str(head)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{other} holds features of another body or setting: resize 'center-crop' (expected 'squash')" \
        in result.output


def test_cli_takes_head_defaults_from_the_estimators(two_caches, tmp_path):
    cache = str(two_caches / "squash.zarr")
    result = CliRunner().invoke(main, ["train", "--cache", cache, "--head", "logistic", "-o", str(tmp_path / "l.head")])
    assert result.exit_code == 0, result.output
    assert load_head(tmp_path / "l.head").get_params() == LogisticHead().get_params()
    result = CliRunner().invoke(main, ["train", "--cache", cache, "--head", "logistic", "--epochs", "5",
                                       "-o", str(tmp_path / "x.head")])
    assert result.exit_code == 2 and "--head logistic takes no --epochs" in result.output
    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "0.0001 (softmax, mlp), 0.01 (logistic)" in help_text and "256 (mlp)" in help_text


def test_a_bug_keeps_its_traceback(two_caches, monkeypatch, tmp_path):
    import headstart.pipeline.train as train_module

    def broken(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr(train_module, "train_head", broken)
    result = CliRunner().invoke(main, ["train", "--cache", str(two_caches / "squash.zarr"),
                                       "-o", str(tmp_path / "h.head")])
    assert isinstance(result.exception, KeyError)  # not turned into a one-line "Error: 'missing'"


def test_training_streams_a_cache_larger_than_the_memory_budget(two_caches, random_model, tmp_path):
    extract(two_caches / "d", random_model, tmp_path / "c.zarr", batch_size=16, progress=False)  # 16-row chunks
    cache = str(tmp_path / "c.zarr")
    out = CliRunner().invoke(main, ["train", "--cache", cache, "--layer", "pool5", "--memory", "20kB",
                                    "--head", "softmax", "--epochs", "30", "--lr", "0.01",
                                    "-o", str(tmp_path / "s.head")])
    assert out.exit_code == 0, out.output
    assert "exceed the 0.00 GiB memory budget: streaming them from the cache in 2 blocks of up to 16 rows" \
        in out.output  # never less than a chunk
    streamed = load_head(tmp_path / "s.head")
    in_memory = train_head(cache, "pool5", "softmax", epochs=30, lr=0.01)
    np.testing.assert_allclose(streamed.mean_, in_memory.mean_, rtol=1e-4, atol=1e-4)  # one streaming pass
    assert streamed.meta_["metrics"]["valid_accuracy"] == in_memory.meta_["metrics"]["valid_accuracy"] == 1.0
    refused = CliRunner().invoke(main, ["train", "--cache", cache, "--layer", "pool5", "--memory", "20kB",
                                        "--head", "logistic", "-o", str(tmp_path / "l.head")])
    assert refused.exit_code == 1 and "raise --memory, or use --head softmax or mlp" in refused.output
    bad = CliRunner().invoke(main, ["train", "--cache", cache, "--memory", "lots", "-o", str(tmp_path / "x.head")])
    assert bad.exit_code == 2 and "--memory 'lots'" in bad.output


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_standardization_statistics_are_exact_in_one_pass_even_far_from_zero(dtype):
    """Merged per-block moments: a spread of 0.01 around 1,000 (float32) survives; float16 does not overflow."""
    rng = np.random.default_rng(0)
    spread, centre = (1.0, 200.0) if dtype == np.float16 else (0.01, 1000.0)
    X = (rng.standard_normal((9000, 30)) * spread + centre).astype(dtype)
    y = np.arange(9000) % 2
    head = SoftmaxHead(epochs=1, min_steps=0).fit(X, y)
    exact = X.astype(np.float64)
    np.testing.assert_allclose(head.mean_, exact.mean(0), rtol=1e-6)
    np.testing.assert_allclose(head.scale_, exact.std(0), rtol=1e-4)
    streamed = SoftmaxHead(epochs=1, min_steps=0).fit_blocks(lambda rng: ((np.arange(i, i + 1000), X[i:i + 1000])
                                                            for i in range(0, 9000, 1000)), 30, y)
    np.testing.assert_allclose(streamed.mean_, head.mean_, rtol=1e-6)
    np.testing.assert_allclose(streamed.scale_, head.scale_, rtol=1e-5)


def test_bench_heads_times_softmax_and_mlp_on_the_caches_shapes(tmp_path):
    result = CliRunner().invoke(main, ["bench", "heads", "--rows", "300", "--epochs", "2", "--mlp-rows", "100",
                                       "--json", str(tmp_path / "heads.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "heads.json").read_text())["rows"]
    assert [(r["head"], r["rows"], r["dim"], r["dtype"], r["epochs"]) for r in rows] == [
        ("softmax", 300, 512, "float32", 2), ("softmax", 300, 25_088, "float16", 2),
        ("mlp", 100, 25_088, "float16", 20)]
    assert all(0 < r[key] < 1000 * r["seconds"] for r in rows for key in ("ms_per_epoch", "first_epoch_ms"))


def _adam_steps() -> None:
    adam = optimizers.Adam([np.ones((1100, 1000), np.float32)])
    assert len(adam.shares) > 1 or compute.cores() == 1
    adam.grads[0][...] = 1.0
    adam.step(0.01)


def test_adam_threads_work_in_a_forked_child_of_a_process_that_used_them():
    """The threads belong to the process that started them: a forked child gets its own pool, not a copy of its
    parent's without threads, whose work would never run."""
    _adam_steps()
    child = multiprocessing.get_context("fork").Process(target=_adam_steps)
    child.start()
    child.join(30)
    hung = child.is_alive()
    child.kill()
    assert not hung and child.exitcode == 0


def test_a_linear_softmax_head_starts_at_zero_and_learns_a_linear_rule():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 20)).astype(np.float32)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(int)
    untrained = SoftmaxHead(epochs=1, lr=1e-9).fit(X, y)  # a random start would show here
    np.testing.assert_allclose(untrained.predict_proba(X), 0.5, atol=1e-4)
    from sklearn.model_selection import GridSearchCV

    search = GridSearchCV(SoftmaxHead(epochs=500), {"l2": [1e-4, 1e-2]}, cv=3).fit(X, y)
    assert search.best_score_ >= 0.9
    mlp = MLPHead(epochs=1, lr=1e-9).fit(X, y)  # hidden layers keep their random start
    assert np.abs(mlp.predict_proba(X) - 0.5).max() > 1e-3


def test_softmax_defaults_learn_a_linear_rule_from_300_rows_in_a_grid_search():
    """Training runs at least min_steps Adam steps: 200 rows a fold get 2,000, not 20 epochs' 80."""
    from sklearn.model_selection import GridSearchCV

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 20)).astype(np.float32)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(int)
    assert GridSearchCV(SoftmaxHead(), {"l2": [1e-4, 1e-2]}, cv=3).fit(X, y).best_score_ >= 0.9


def test_every_error_a_user_can_cause_is_a_headstart_error(tmp_path):
    """Bad parameters are UsageErrors, bad data DataErrors, a model that is not a body a ModelError: all
    HeadstartErrors (which the CLI prints as one line), and still ValueErrors, as scikit-learn expects."""
    from onnx import TensorProto, helper

    from headstart.export.errors import DataError, HeadstartError, ModelError, UsageError
    from headstart.heads import AutoHead, KNNHead
    from headstart.heads.bundle import bundle, classifier_metadata

    X, y = blobs(n=60)
    bad_params = [SoftmaxHead(lr=-1), MLPHead(dropout=1.0), LogisticHead(l2=0), KNNHead(n_neighbors=0),
                  AutoHead(folds=1), AutoHead(calibrate="platt"), SoftmaxHead(class_weight="heavy"),
                  KNNHead(class_weight="heavy")]
    for head in bad_params:
        with pytest.raises(UsageError):
            head.fit(X, y)
    fitted = SoftmaxHead(epochs=1).fit(X, y)
    bad_data = [lambda: SoftmaxHead().fit(np.zeros(3), np.zeros(3, int)),
                lambda: LogisticHead().fit(X, np.zeros(60, int)),
                lambda: AutoHead().fit(X, np.zeros(60, int)),
                lambda: KNNHead().fit(X, np.linspace(0, 1, 60)),
                lambda: MLPHead().fit(X, y, X_valid=X[:2], y_valid=np.array(["cat", "emu"])),
                lambda: SoftmaxHead().fit(np.where(np.arange(6) == 2, np.nan, X), y),
                lambda: fitted.predict(X[:, :4])]
    for call in bad_data:
        with pytest.raises(DataError) as e:
            call()
        assert isinstance(e.value, HeadstartError) and isinstance(e.value, ValueError)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    (tmp_path / "plain.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    fitted.meta_ = {"layer": "gap", "fingerprint": {}}
    with pytest.raises(ModelError, match="plain.onnx: not a headstart body model"):
        bundle(tmp_path / "plain.onnx", fitted)
    with pytest.raises(ModelError, match="plain.onnx: not a headstart classifier"):
        classifier_metadata(tmp_path / "plain.onnx")
