"""Tags and values as tasks on the cache: manifest columns and tags maps -> train -> evaluate -> bundle -> predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import allow_real_photos, generated_images, photos
from PIL import Image

from headstart.pipeline.cli import main


def cli(*args, ok: bool = True) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
    return result.output


def brightness(path) -> float:
    with Image.open(path) as img:
        return float(np.asarray(img.convert("RGB"), np.float64).mean())


@pytest.fixture(scope="module")
def manifest_cache(random_model, tmp_path_factory):
    """Generated images of three colours, a manifest with their tags (colour, and `bright` above the median
    brightness) and brightness, and a cache of them."""
    root = tmp_path_factory.mktemp("tasks")
    images = generated_images(root / "img", 24, classes=("a", "b", "c"))
    values = [brightness(p) for p in images]
    median = float(np.median(values))
    with open(root / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "labels", "brightness"])
        for i, (p, v) in enumerate(zip(images, values, strict=True)):
            tags = [p.parent.name] + (["bright"] if v > median else []) if i != 7 else []  # 7: none of the tags
            w.writerow([p.relative_to(root), p.parent.name, "valid" if i % 4 == 0 else "train", "|".join(tags),
                        f"{v:.3f}" if i != 5 else ""])  # one image without a value: outside the value task
    cli("extract", root / "m.csv", "--body", random_model, "--cache", root / "c.zarr")
    return root, images, values


def test_a_manifests_task_columns_are_kept_and_a_misspelt_core_column_is_refused(tmp_path):
    from headstart.pipeline.dataset import scan

    (tmp_path / "m.csv").write_text("path,label,labels,age\na.jpg,cat,cat|dark,3.5\nb.jpg,dog,dog,\n")
    ds = scan(tmp_path / "m.csv")
    assert ds.columns == {"labels": ["cat|dark", "dog"], "age": ["3.5", ""]} and ds.classes == ["cat", "dog"]
    (tmp_path / "m.csv").write_text("path,lable\na.jpg,cat\n")
    out = cli("extract", tmp_path / "m.csv", "--body", "x.onnx", "--cache", tmp_path / "c", ok=False)
    assert "lable looks like a misspelt label" in out


@pytest.mark.parametrize("kind", ["auto", "mlp"])
def test_value_task_trains_evaluates_bundles_and_predicts(manifest_cache, random_model, tmp_path, kind):
    root, images, values = manifest_cache
    out = cli("train", "--cache", root / "c.zarr", "--layer", "gap", "--target", "brightness", "--head", kind, "-o",
              tmp_path / "v.head")
    assert "1 of 72 rows have no brightness" in out and "value head on gap" in out
    out = cli("evaluate", "--cache", root / "c.zarr", "--head-file", tmp_path / "v.head", "--metrics",
              tmp_path / "m.json", "--plot", tmp_path / "scatter.png", "--confusion", tmp_path / "pairs.csv")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"r2", "mae", "rmse", "n"} and metrics["n"] == 18
    assert metrics["r2"] > 0.9  # the classes' colours set the brightness; a head that learned nothing scores ~0
    assert f"R2 {metrics['r2']:.3f}" in out
    with Image.open(tmp_path / "scatter.png") as img:
        assert img.size[0] > 300
    pairs = list(csv.DictReader(open(tmp_path / "pairs.csv")))
    valid_values = sorted(round(v, 3) for i, v in enumerate(values) if i % 4 == 0)
    assert sorted(float(r["actual"]) for r in pairs) == pytest.approx(valid_values, abs=1e-3)
    # bundle -> predict: the classifier's value is the head's on the cached features
    cli("bundle", "--body", random_model, "--head-file", tmp_path / "v.head", "-o", tmp_path / "v.onnx")
    cli("predict", root / "m.csv", "--classifier", tmp_path / "v.onnx", "-o", tmp_path / "p.csv")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["id", "value", "path", "error"] and len(rows) == len(images)
    from headstart.heads.headfile import load_head
    from headstart.pipeline.cache import FeatureCache

    fc, head = FeatureCache(root / "c.zarr"), load_head(tmp_path / "v.head")
    expected = dict(zip(fc.paths, head.predict(fc.features("gap")), strict=True))
    got = {r["path"]: float(r["value"]) for r in rows}
    scale = max(abs(v) for v in expected.values())
    # the cache keeps float16 features (relative step 1e-3), the classifier computes them in float32
    assert max(abs(got[p] - v) for p, v in expected.items()) / scale < 1e-3


@pytest.mark.parametrize("kind", ["auto", "sigmoid"])
def test_tags_task_from_a_manifest_column(manifest_cache, random_model, tmp_path, kind):
    root, images, _ = manifest_cache
    out = cli("train", "--cache", root / "c.zarr", "--tags", "labels", "--head", kind, "-o", tmp_path / "t.head")
    assert "4 tags: a, b, bright, c" in out
    assert "54 train / 18 valid rows" in out  # all of them: an empty tags cell is an image with none of the tags
    out = cli("evaluate", "--cache", root / "c.zarr", "--head-file", tmp_path / "t.head", "--json", "-")
    result = json.loads(out)
    # the colour tags are the classes' own colours: a head that learned nothing could not separate them
    assert all(result["per_tag"][t]["ap"] > 0.9 for t in "abc"), result["per_tag"]
    cli("bundle", "--body", random_model, "--head-file", tmp_path / "t.head", "-o", tmp_path / "t.onnx")
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "tags"]
    cli("predict", root / "img", "--classifier", tmp_path / "t.onnx", "-o", tmp_path / "p.csv")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0])[:2] == ["id", "tags"] and {"a", "b", "bright", "c"} <= set(rows[0])
    for r in rows:  # the tags column is the tags whose probability reaches their threshold
        from headstart.heads.headfile import load_head

        head = load_head(tmp_path / "t.head")
        on = [t for t, th in zip(head.tags_, head.thresholds_, strict=True) if float(r[t]) >= th - 1e-5]
        assert r["tags"].split("|") == on or (r["tags"] == "" and not on)
    colour = {r["path"].rsplit("/", 2)[-2]: r["tags"] for r in rows}
    assert all(c in colour[c].split("|") for c in "abc")


def test_tags_map_task_on_class_folders(manifest_cache, tmp_path):
    root, _, _ = manifest_cache
    (tmp_path / "tags.yaml").write_text("a: [warm, first]\nb: warm\nc: []\n")
    out = cli("train", "--cache", root / "c.zarr", "--tags-map", tmp_path / "tags.yaml", "-o", tmp_path / "t.head")
    assert "2 tags: first, warm" in out
    result = json.loads(cli("evaluate", "--cache", root / "c.zarr", "--head-file", tmp_path / "t.head", "--json",
                            "-"))
    assert result["mAP"] > 0.9 and result["n"] == 18


@pytest.mark.parametrize("args, message", [
    (["--target", "nope"], "no column 'nope'"),
    (["--target", "labels"], "is 'a', not a number"),
    (["--target", "brightness", "--head", "softmax"], "--head softmax: a value task takes auto, ridge, mlp"),
    (["--tags", "labels", "--head", "knn"], "--head knn: a tags task takes auto, logistic, sigmoid"),
    (["--tags", "labels", "--target", "brightness"], "--tags and --target each define the task"),
    (["--target", "brightness", "--classes-map", "CMAP"], "--classes-map and --relabel change class labels"),
])
def test_task_mistakes_are_one_line_errors(manifest_cache, tmp_path, args, message):
    root, _, _ = manifest_cache
    (tmp_path / "cmap.yaml").write_text("a: x\nb: y\n")
    args = [tmp_path / "cmap.yaml" if a == "CMAP" else a for a in args]
    out = cli("train", "--cache", root / "c.zarr", *args, "-o", tmp_path / "h.head", ok=False)
    assert message in out, out
    assert not (tmp_path / "h.head").exists()


def test_a_column_needs_a_manifest(random_model, tmp_path):
    generated_images(tmp_path / "d", 4)
    cli("extract", tmp_path / "d", "--body", random_model, "--cache", tmp_path / "c.zarr")
    out = cli("train", "--cache", tmp_path / "c.zarr", "--target", "age", "-o", tmp_path / "h.head", ok=False)
    assert "was not read from a CSV manifest" in out and "--manifest FILE.csv" in out


def test_the_python_api_and_a_damaged_task_head_file(manifest_cache, tmp_path):
    import headstart as hs

    root, _, values = manifest_cache
    head = hs.train_head(root / "c.zarr", "gap", "ridge", target=hs.Target("value", "brightness"), seed=3)
    assert head.meta_["target"]["column"] == "brightness" and head.meta_["selection"]["seed"] == 3
    hs.save_head(head, tmp_path / "v.head")
    back = hs.load_head(tmp_path / "v.head")
    X = hs.FeatureCache(root / "c.zarr").features("gap")
    assert np.array_equal(back.predict(X), head.predict(X)) and back.alpha_ == head.alpha_
    # a file whose arrays do not fit its metadata is refused when loaded, naming it
    with np.load(tmp_path / "v.head") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coef_"] = arrays["coef_"][:100]
    with open(tmp_path / "bad.head", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(hs.HeadFileError, match="bad.head: not a usable head file: its arrays do not fit"):
        hs.load_head(tmp_path / "bad.head")
    out = cli("train", "--cache", root / "c.zarr", "--target", "brightness", "--augmented", "-o", tmp_path / "a.head",
              ok=False)
    assert "--augmented trains heads of classes" in out


@pytest.fixture(scope="module")
def catsdogs_manifest(photo_cache):
    """A manifest of photo_cache's photos (their own paths, which the cache holds as links) with each photo's
    brightness and two tags: its species, and `dark` (brightness below the training photos' median)."""
    allow_real_photos()
    train, valid = photos("train", 400), photos("valid")
    values = {p: brightness(p) for p in train + valid}
    median = float(np.median([values[p] for p in train]))
    path = photo_cache.parent / "m.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "brightness"])
        for p, v in values.items():
            w.writerow([p, "|".join([p.parent.name[:-1]] + (["dark"] if v < median else [])), f"{v:.3f}"])
    return path


@pytest.mark.slow
def test_brightness_and_two_tags_on_the_catsdogs_photos(photo_cache, catsdogs_manifest, tmp_path, capsys):
    cache, manifest, root = photo_cache, catsdogs_manifest, tmp_path
    scores = {}
    for layer in ("gap3", "gap"):
        cli("train", "--cache", cache, "--layer", layer, "--target", "brightness", "--manifest",
            manifest, "-o", root / f"b-{layer}.head")
        scores[layer] = json.loads(cli("evaluate", "--cache", cache, "--head-file", root / f"b-{layer}.head",
                                       "--json", "-"))
    assert scores["gap3"]["n"] == 200 and scores["gap3"]["r2"] > 0.8, scores["gap3"]
    cli("train", "--cache", cache, "--layer", "gap", "--tags", "labels", "--manifest", manifest,
        "-o", root / "t.head")
    tags = json.loads(cli("evaluate", "--cache", cache, "--head-file", root / "t.head", "--json", "-"))
    assert tags["outputs"] == ["cat", "dark", "dog"] and tags["n"] == 200
    assert tags["per_tag"]["cat"]["ap"] > 0.9 and tags["mAP"] > 0.85, tags
    with capsys.disabled():  # the figures docs/heads.md reports
        print(f"\nbrightness R2: gap3 {scores['gap3']['r2']:.3f} (MAE {scores['gap3']['mae']:.2f}), gap "
              f"{scores['gap']['r2']:.3f}; tags mAP {tags['mAP']:.3f}, AP " +
              ", ".join(f"{t} {r['ap']:.3f}" for t, r in tags["per_tag"].items()) +
              f", micro F1 {tags['micro_f1']:.3f}")


def test_review_cases_of_manifests_and_maps(manifest_cache, tmp_path):
    import headstart as hs
    from headstart.pipeline.targets import read_tags_map

    root, images, _ = manifest_cache
    rows = (root / "m.csv").read_text().splitlines()
    # a path listed twice with two values is refused, naming it
    (tmp_path / "dup.csv").write_text("\n".join(rows + [rows[2].rsplit(",", 1)[0] + ",99999"]) + "\n")
    out = cli("train", "--cache", root / "c.zarr", "--manifest", tmp_path / "dup.csv", "--target", "brightness",
              "-o", tmp_path / "h.head", ok=False)
    assert "is listed twice, with brightness" in out and "'99999'" in out
    # tags and class names are read as written: YAML 1.1 would make yes/no booleans
    (tmp_path / "t.yaml").write_text("a: [yes]\nb: [no]\nc: on\n")
    assert read_tags_map(tmp_path / "t.yaml") == {"a": ("yes",), "b": ("no",), "c": ("on",)}
    assert hs.Target("tags", tags_map={"a": "xy", "b": ["x"]}).tags_map == {"a": ("xy",), "b": ("x",)}
    # every training row with one value: nothing to learn
    (tmp_path / "const.csv").write_text("path,age\n" + "".join(f"{p},5\n" for p in images))
    out = cli("train", "--cache", root / "c.zarr", "--manifest", tmp_path / "const.csv", "--target", "age", "-o",
              tmp_path / "h.head", ok=False)
    assert "every training row has the same age (5)" in out
    for args, message in ((["--target", "brightness", "--class-weight", "balanced"], "--class-weight weighs"),
                          (["--tags-map", tmp_path / "t.yaml", "--manifest", root / "m.csv"], "drop one of them"),
                          (["--tags", "label"], "'label' is a manifest's own column")):
        assert message in cli("train", "--cache", root / "c.zarr", *args, "-o", tmp_path / "h.head", ok=False)
    assert not (tmp_path / "h.head").exists()


def test_a_task_from_another_folder_and_a_changed_manifest(random_model, tmp_path, monkeypatch):
    images = generated_images(tmp_path / "d" / "img", 12)
    monkeypatch.chdir(tmp_path)  # extract stores the paths relative to the folder it runs in
    with open("d/m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "brightness"])
        for i, p in enumerate(images):
            w.writerow([p.relative_to(tmp_path / "d"), "valid" if i % 3 == 0 else "train", f"{brightness(p):.3f}"])
    cli("extract", "d/m.csv", "--body", random_model, "--cache", "d/c.zarr")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = cli("train", "--cache", "../d/c.zarr", "--target", "brightness", "-o", "v.head")
    assert "16 train / 8 valid rows" in out
    exclude = tmp_path / "ex.txt"
    exclude.write_text(f"{images[1].name}\n")
    out = cli("train", "--cache", "../d/c.zarr", "--target", "brightness", "--exclude", exclude, "-o", "x.head")
    assert "exclusions leave out 1 rows" in out and "have no brightness" not in out
    result = json.loads(cli("evaluate", "--cache", "../d/c.zarr", "--head-file", "v.head", "--json", "-"))
    assert result["n"] == 8
    # the manifest changed since training: evaluate says so; --manifest reads another one
    text = (tmp_path / "d" / "m.csv").read_text()
    (tmp_path / "d" / "m.csv").write_text(text + "\n")
    result = CliRunner().invoke(main, ["evaluate", "--cache", "../d/c.zarr", "--head-file", "v.head"])
    assert result.exit_code == 0 and "changed since the head was trained" in result.output
    (tmp_path / "copy.csv").write_text("path,brightness\n" + "".join(f"{p},{brightness(p):.3f}\n" for p in images))
    out = cli("evaluate", "--cache", "../d/c.zarr", "--head-file", "v.head", "--manifest", tmp_path / "copy.csv")
    assert "changed since" not in out and "8 rows: R2" in out
    cli("bundle", "--body", random_model, "--head-file", "v.head", "-o", "v.onnx")
    out = cli("predict", tmp_path / "d" / "img", "--classifier", "v.onnx", "--clip", "0.1,0.9", ok=False)
    assert "--clip clips probabilities" in out
