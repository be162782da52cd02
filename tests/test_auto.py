"""AutoHead: the choice by cross-validation on the training rows, its file, its bundle, its calibration (hermetic)."""

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import generated_images, pixels, run_head_graph
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils.class_weight import compute_sample_weight

from headstart.heads import AutoHead, KNNHead, LogisticHead, MLPHead, SoftmaxHead, load_head, save_head
from headstart.heads.auto import fit_temperature, make_folds
from headstart.heads.bundle import bundle
from headstart.heads.linear import fit_logistic, logits_of
from headstart.heads.metrics import expected_calibration_error, wilson
from headstart.heads.models import softmax
from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.train import train_head


def blobs(n=120, d=24, k=3, spread=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.standard_normal((k, d)) * spread
    X = np.abs(rng.standard_normal((n, d)) + centres[y] + 3).astype(np.float32)  # positive, as ReLU features are
    return X, np.array(["ant", "bee", "cow", "dog"])[y]


def test_auto_is_a_plain_estimator_that_records_its_choice():
    X, y = blobs()
    head = AutoHead(random_state=4)
    assert clone(head).get_params() == head.get_params()
    assert head.fit(X, y) is head
    assert head.classes_.tolist() == ["ant", "bee", "cow"] and head.predict_proba(X).shape == (120, 3)
    assert head.score(X, y) > 0.9
    assert head.cv_ == {"method": "stratified 5-fold", "splits": 5, "seed": 4, "rows": 120}
    names = [r["name"] for r in head.cv_results_]
    assert head.winner_ in names and any(n.startswith("knn") for n in names)
    assert any("normalized" in n for n in names) and any("standardized" in n for n in names)
    assert all(r["low"] <= r["accuracy"] <= r["high"] and r["n"] == 120 for r in head.cv_results_)
    assert [r["chosen"] for r in head.table()].count("<-") == 1
    # In a Pipeline and under cross_val_score, as any scikit-learn classifier.
    assert cross_val_score(make_pipeline(PCA(8), AutoHead()), X, y, cv=3).mean() > 0.9


def test_the_adam_heads_are_candidates_only_on_enough_rows(tmp_path):
    X, y = blobs(n=150)
    assert not any(r["kind"] in ("softmax", "mlp") for r in AutoHead().fit(X, y).cv_results_)
    head = AutoHead(adam_rows=150, l2_grid=(1e-2,), neighbors=(5,)).fit(X, y)
    assert [r["name"] for r in head.cv_results_] == ["logistic l2=0.01 standardized", "logistic l2=0.01 normalized",
                                                     "knn k=5", "softmax (defaults)", "mlp (defaults)"]
    # On XOR, where no linear head and no wide vote can follow, the MLP wins; its file and graph hold it.
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (400, 4)).astype(np.float32) + 2
    y = ((X[:, 0] > 2) ^ (X[:, 1] > 2)).astype(int)
    head = AutoHead(adam_rows=100, neighbors=(300,)).fit(X, y)
    assert head.winner_ == "mlp (defaults)" and head.score(X, y) > 0.9
    head.meta_ = {}
    loaded = load_head(save_head(head, tmp_path / "h.head"))
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    np.testing.assert_allclose(run_head_graph(loaded, X), head.predict_proba(X), atol=1e-5)


def test_folds_follow_the_smallest_class():
    y = np.array([0] * 50 + [1] * 3)
    folds, how = make_folds(y, 5, 10_000, 0)
    assert how["method"] == "leave-one-out" and len(folds) == 53 and all(len(te) == 1 for _, te in folds)
    y = np.repeat([0, 1], 400)
    folds, how = make_folds(y, 5, 10_000, 7)
    assert how == {"method": "stratified 5-fold", "splits": 5, "seed": 7, "rows": 800}
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(800))
    assert all(np.bincount(y[te]).tolist() == [80, 80] for _, te in folds)
    folds, how = make_folds(np.repeat([0, 1], 300), 5, 500, 7)
    assert how["method"] == "held-out 10%" and len(folds) == 1 and len(folds[0][1]) == 60
    # The seed decides the folds, and the same seed gives the same ones.
    a, b = make_folds(y, 5, 10_000, 1)[0], make_folds(y, 5, 10_000, 1)[0]
    assert all((p[1] == q[1]).all() for p, q in zip(a, b, strict=True))
    assert any((p[1] != q[1]).any() for p, q in zip(a, make_folds(y, 5, 10_000, 2)[0], strict=True))


def test_the_choice_never_reads_the_validation_rows():
    X, y = blobs(n=130)
    X, y, Xv, yv = X[:90], y[:90], X[90:], y[90:]
    clean = AutoHead().fit(X, y, X_valid=Xv, y_valid=yv)
    poisoned = AutoHead().fit(X, y, X_valid=Xv * 100 + 5, y_valid=np.roll(yv, 1))
    scores = [[{k: v for k, v in r.items() if k != "seconds"} for r in h.cv_results_] for h in (clean, poisoned)]
    assert clean.winner_ == poisoned.winner_ and scores[0] == scores[1]
    np.testing.assert_array_equal(clean.predict_proba(X), poisoned.predict_proba(X))
    assert clean.history_[-1]["valid_accuracy"] > poisoned.history_[-1]["valid_accuracy"]


def test_our_logistic_solver_reaches_scikit_learns_optimum():
    for k in (2, 3):
        X, y = blobs(n=200, k=k, spread=0.6)
        for class_weight in (None, "balanced"):
            ours = LogisticHead(l2=1e-2, class_weight=class_weight).fit(X, y)
            Z = (X - ours.mean_) / ours.scale_
            theirs = LogisticRegression(C=1 / (1e-2 * len(X)), class_weight=class_weight, tol=1e-8,
                                        max_iter=5000).fit(Z, y)
            np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(Z), atol=5e-3)  # at tol 1e-4
            w = None if class_weight is None else compute_sample_weight("balanced", y)
            theta, _ = fit_logistic(Z, np.unique(y, return_inverse=True)[1], k, 1e-2, w, tol=1e-8)
            np.testing.assert_allclose(softmax(logits_of(theta, Z, k)), theirs.predict_proba(Z), atol=1e-4)


@pytest.mark.parametrize("make", [lambda: KNNHead(n_neighbors=5), lambda: KNNHead(n_neighbors=500),
                                  lambda: KNNHead(class_weight="balanced"),
                                  lambda: LogisticHead(normalize=True, l2=1e-3),
                                  lambda: LogisticHead(normalize=True, standardize=False, l2=1e-4), AutoHead])
def test_head_files_and_onnx_graphs_give_the_estimators_probabilities(make, tmp_path):
    X, y = blobs(n=190, k=3, spread=0.8)
    X, y, Xt = X[:150], y[:150], X[150:]
    head = make().fit(X, y)
    head.meta_ = {"task": "t", "layer": "gap"}
    want = head.predict_proba(Xt)
    loaded = load_head(save_head(head, tmp_path / "h.head"))
    assert type(loaded) is type(head) and loaded.get_params() == head.get_params()
    np.testing.assert_array_equal(loaded.predict_proba(Xt), want)
    np.testing.assert_allclose(run_head_graph(loaded, Xt), want, atol=1e-5)
    if isinstance(head, AutoHead):
        assert loaded.winner_ == head.winner_ and loaded.cv_ == head.cv_ and loaded.cv_results_ == head.cv_results_
        assert loaded.temperature_ == head.temperature_


def test_auto_bundles_with_the_body_and_predicts_as_trained(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 12, "train", ("a", "b", "c"))
    valid = generated_images(data, 4, "valid", ("a", "b", "c"), seed=1)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, dtype="float32", progress=False)
    head = train_head(cache, "gap")  # the default kind: auto
    assert isinstance(head, AutoHead) and head.meta_["rows"] == {"train": 36, "valid": 12}
    fc = FeatureCache(cache)
    rows = np.flatnonzero(fc.splits == "valid")
    want = head.predict_proba(fc.features("gap", rows))
    model = bundle(random_model, head)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    order = {str(p): i for i, p in enumerate(fc.paths[rows])}
    got = session.run(["probabilities"], {"images": pixels(sorted(valid, key=lambda p: order[str(p)]), 32)})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_train_prints_the_candidates_table_with_intervals(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 10, "train")
    generated_images(data, 4, "valid", seed=1)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, progress=False)
    out = CliRunner().invoke(main, ["train", "--cache", str(cache), "-o", str(tmp_path / "h.head")])
    assert out.exit_code == 0, out.output
    assert "auto: stratified 5-fold of 20 training rows (seed 0)" in out.output
    assert "| candidate | cv_log_loss | cv_accuracy | chosen |" in out.output and "<-" in out.output
    assert "refit on all training rows" in out.output
    saved = load_head(tmp_path / "h.head")
    assert saved.cv_["rows"] == 20 and saved.winner_ in out.output
    refused = CliRunner().invoke(main, ["train", "--cache", str(cache), "--epochs", "3", "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--head auto takes no --epochs" in refused.output


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    n, k = 3000, 4
    true_logits = rng.standard_normal((n, k)) * 1.5
    y = np.array([rng.choice(k, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 4  # right ranking, four times too sure
    t = fit_temperature(overconfident, y)
    assert 3 < t < 5
    before = expected_calibration_error(y, softmax(overconfident))
    after = expected_calibration_error(y, softmax(overconfident / t))
    assert after < before / 3


def test_balanced_class_weights_raise_balanced_accuracy_on_a_10_to_1_toy():
    rng = np.random.default_rng(1)

    def draw(n_a, n_b):
        X = np.vstack([rng.normal(0, 1, (n_a, 8)), rng.normal(0.8, 1, (n_b, 8))]) + 3
        return X.astype(np.float32), np.array([0] * n_a + [1] * n_b)

    X, y = draw(500, 50)
    Xt, yt = draw(500, 500)
    for make in (lambda w: AutoHead(class_weight=w), lambda w: KNNHead(class_weight=w),
                 lambda w: LogisticHead(class_weight=w), lambda w: SoftmaxHead(class_weight=w),
                 lambda w: MLPHead(hidden=(32,), class_weight=w)):
        plain = balanced_accuracy_score(yt, make(None).fit(X, y).predict(Xt))
        weighted = balanced_accuracy_score(yt, make("balanced").fit(X, y).predict(Xt))
        assert weighted > plain + 0.03, (plain, weighted)


def test_wilson_interval():
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    low, high = wilson(180, 200)
    assert low < 0.9 < high and 0.08 < high - low < 0.09


def test_bench_fewshot_scores_every_head_on_the_valid_split(tmp_path, random_model):
    data = tmp_path / "d"
    generated_images(data, 6, "train")
    generated_images(data, 4, "valid", seed=1)
    cache = tmp_path / "c.zarr"
    extract(data, random_model, cache, progress=False)
    out = CliRunner().invoke(main, ["bench", "fewshot", "--cache", str(cache), "--sizes", "1,5", "--draws", "2",
                                    "--json", str(tmp_path / "f.json")])
    assert out.exit_code == 0, out.output
    import json

    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [(r["per_class"], r["head"]) for r in rows][:2] == [(1, "softmax"), (1, "logistic")]
    assert len(rows) == 2 * 6 and {r["head"] for r in rows} >= {"auto", "knn5_cosine", "sklearn_lr_c1_normalized"}
    assert all(r["low"] <= r["accuracy"] <= r["high"] for r in rows)
    assert "| per_class | head | accuracy | low | high |" in out.output
