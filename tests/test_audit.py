"""headstart audit: confident learning on known flips, near-duplicates of generated copies, leaks across splits,
the exclude file, an S3 cache, and the HTML report as headless Chromium renders it."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import STRICT
from PIL import Image, ImageDraw, ImageFilter

from headstart.export.errors import DataError
from headstart.heads.confident import confident_joint, find_label_issues
from headstart.pipeline.audit import audit, exclude_paths, groups_of, nearest, oof_proba, unit_rows, write_exclude
from headstart.pipeline.auditbench import generated_features, write_cache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.report import write_report


def cli(*args, ok: bool = True) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def test_confident_joint_counts_rows_by_given_and_confident_class():
    labels = np.array([0, 0, 0, 1, 1, 1])
    proba = np.array([[.9, .1], [.8, .2], [.3, .7], [.2, .8], [.1, .9], [.6, .4]])
    # thresholds: class 0 mean(.9, .8, .3) = 2/3, class 1 mean(.8, .9, .4) = 0.7
    joint = confident_joint(labels, proba, calibrate=False)
    assert joint.tolist() == [[2, 1], [0, 2]]  # row 5 (.6 < 2/3, .4 < .7) reaches no threshold
    assert confident_joint(labels, proba).sum(1).tolist() == [3, 3]  # calibrated to the given counts
    assert find_label_issues(labels, proba).tolist() == [2]


def test_confident_learning_ranks_known_flips_first():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 16))
    true = np.repeat(np.arange(3), 100)
    X = centres[true] + rng.normal(0, 1, (300, 16))
    flipped = rng.choice(300, 15, replace=False)
    given = true.copy()
    given[flipped] = (given[flipped] + 1) % 3
    for head in ("logistic", "ridge", "auto"):
        proba, _ = oof_proba(X, given, 5, head)
        np.testing.assert_allclose(proba.sum(1), 1, atol=1e-6)
        for rank_by in ("self_confidence", "normalized_margin"):
            issues = find_label_issues(given, proba, rank_by)
            assert len(set(issues[:30]) & set(flipped)) >= 13, (head, rank_by)
            assert len(set(issues) - set(flipped)) <= 5, (head, rank_by)
            given_p = proba[issues, given[issues]]
            if rank_by == "self_confidence":  # least believed first
                assert np.all(np.diff(given_p) >= 0)


def test_oof_needs_two_labelled_rows_a_class():
    with pytest.raises(DataError, match="at least 2"):
        oof_proba(np.zeros((5, 3)), np.array([0, 0, 0, 0, 1]), 5, "ridge")


def _photo(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A distinct generated 'photo': a smooth background and a few shapes, blurred."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(8, 30))
        box = (int(x) - r, int(y) - r, int(x) + r, int(y) + r)
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < .5 else draw.rectangle)(box, fill=fill)
    return img.filter(ImageFilter.GaussianBlur(1.5))


def _copies(img: Image.Image, folder, stem: str) -> list:
    w, h = img.size
    out = [folder / f"{stem}-resized.png", folder / f"{stem}-jpeg.jpg", folder / f"{stem}-cropped.png"]
    img.resize((int(w * .8), int(h * .8)), Image.LANCZOS).save(out[0])
    img.save(out[1], quality=60)
    img.crop((3, 3, w - 3, h - 3)).save(out[2])
    return out


def test_near_duplicates_of_generated_copies_and_none_among_distinct_images(random_model, tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "d"
    originals = []
    for split, n in (("train", 16), ("valid", 8)):
        for cls in ("a", "b"):
            (data / split / cls).mkdir(parents=True)
            for i in range(n):
                p = data / split / cls / f"{i}.png"
                _photo(rng).save(p)
                originals.append(p)
    planted = {}
    for p in originals[:4]:  # train photos of class a, copied into valid
        for c in _copies(Image.open(p), data / "valid" / "a", p.stem):
            planted[str(c)] = str(p)
    extract(data, random_model, tmp_path / "c.zarr", batch_size=8, progress=False)
    # Random weights squeeze every cosine towards 1 (distinct images reach 0.986 here, copies stay above 0.996):
    # the default threshold is for the real body's features, so this test sets one between.
    found = audit(str(tmp_path / "c.zarr"), folds=3, head="ridge", threshold=0.993)
    sims = {(p["a"], p["b"]): p["similarity"] for p in found["pairs"]}
    members = [{m["path"] for m in g["members"]} for g in found["leaks"]]
    assert len(found["leaks"]) == 4 and not found["near_duplicates"]
    for copy, original in planted.items():
        assert any({copy, original} <= g for g in members), copy
    flat = {p for pair in sims for p in pair}
    assert flat == set(planted) | set(planted.values())  # no pair joins two distinct photos
    assert all(len(g) == 4 for g in members)
    for g in found["leaks"]:
        assert {m["split"] for m in g["members"]} == {"train", "valid"} and g["splits"] == ["train", "valid"]


def test_blocked_search_is_exact_whatever_the_memory():
    X = unit_rows(np.random.default_rng(2).normal(size=(300, 8)))
    full = X @ X.T
    np.fill_diagonal(full, -np.inf)
    expected = np.sort(full, 1)[:, ::-1][:, :5]
    for memory in (1, 8 * 300 * 7, 10**9):  # one row a block, seven rows, everything at once
        index, sims = nearest(X, 5, memory, progress=False)
        np.testing.assert_allclose(sims, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.take_along_axis(full, index, 1), sims, rtol=1e-5, atol=1e-6)
    groups, pairs = groups_of(index, sims, 1.1)
    assert groups == [] and len(pairs) == 0


@pytest.fixture
def generated(tmp_path):
    g = generated_features(800, dim=64, classes=4, flip=0.05, copies=6, seed=3)
    # one more near-copy inside train: a near-duplicate that is no leak
    train = np.flatnonzero(g["splits"] == "train")
    a, b = train[-1], train[-2]
    g["X"][b] = g["X"][a] * 1.01
    g["true"][b] = g["labels"][b] = g["labels"][a]
    g["flipped"] = np.setdiff1d(g["flipped"], [a, b])
    classes = ["ant", "bee", "cat", "dog"]
    paths = write_cache(tmp_path / "g.zarr", g["X"], g["labels"], g["splits"], classes)
    return g | {"cache": str(tmp_path / "g.zarr"), "paths": np.array(paths), "inside": (a, b), "classes": classes}


def test_leaks_are_listed_first_with_each_members_split(generated, tmp_path):
    g = generated
    out = cli("audit", "--cache", g["cache"], "-o", tmp_path / "a.html", "--json", tmp_path / "a.json",
              "--write-exclude", tmp_path / "exclude.txt", "--probe", "ridge")
    found = json.loads((tmp_path / "a.json").read_text())
    assert f"leaks: {len(g['copies'])} groups across splits" in out and "wrote " in out
    assert found["version"] == 1 and found["images"] == 800
    leaks = {frozenset(m["path"] for m in grp["members"]) for grp in found["leaks"]}
    assert leaks == {frozenset(g["paths"][pair]) for pair in g["copies"]}
    for grp in found["leaks"]:
        by_path = {m["path"]: m["split"] for m in grp["members"]}
        assert sorted(by_path.values()) == ["train", "valid"]
        assert all(by_path[p] == g["splits"][np.flatnonzero(g["paths"] == p)[0]] for p in by_path)
    assert [{m["path"] for m in grp["members"]} for grp in found["near_duplicates"]] == [set(g["paths"][list(
        g["inside"])])]
    flipped = set(g["paths"][g["flipped"]])
    top = [e["path"] for e in found["label_issues"][:2 * len(flipped)]]
    assert len(flipped & set(top)) >= 0.7 * len(flipped)
    e = found["label_issues"][0]
    assert set(e) >= {"rank", "path", "split", "given", "suggested", "score"} and e["rank"] == 1
    assert [r["rank"] for r in found["label_issues"]] == list(range(1, len(found["label_issues"]) + 1))
    assert sum(c["count"] for c in found["class_overview"]) == 800
    assert np.array(found["confusion"]["matrix"]).sum() == 800
    lines = (tmp_path / "exclude.txt").read_text().splitlines()
    assert lines[0].startswith("#")
    paths = [line for line in lines if line and not line.startswith("#")]
    expected = exclude_paths(found)
    assert paths == list(dict.fromkeys(expected["label_issues"] + expected["leaks"]))
    assert set(expected["leaks"]) == set(g["paths"][g["copies"][:, 1]])  # the valid copies, not the originals
    assert write_exclude(found, tmp_path / "again.txt") == len(paths)


def test_audit_reads_a_cache_in_an_object_store(s3, tmp_path):
    pytest.importorskip("s3fs", reason="the s3 extra: pip install 'headstart[s3]'")
    g = generated_features(300, dim=128, classes=3, copies=3, seed=4)
    cache = f"{s3()}/g.zarr"
    write_cache(cache, g["X"], g["labels"], g["splits"], ["a", "b", "c"])
    found = audit(cache, head="ridge", memory=2**16)
    assert found["cache"] == cache and len(found["leaks"]) == 3


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_its_sections_and_counts_in_chromium(generated, tmp_path):
    browser = _chromium()
    if browser is None:
        if STRICT:
            pytest.fail("chromium is missing (apt-get install -y chromium); HEADSTART_STRICT_DATA=1 makes that a "
                        "failure")
        pytest.skip("chromium is missing: apt-get install -y chromium")
    g = generated
    found = audit(g["cache"], head="ridge")
    # Real thumbnails for one leak: its members' paths point at images on disk; the rest stay placeholders.
    real = tmp_path / "img.jpg"
    Image.new("RGB", (200, 150), (200, 40, 40)).save(real)
    for m in found["leaks"][0]["members"]:
        m["path"] = str(real)
    html = tmp_path / "report.html"
    size = write_report(found, html)
    text = html.read_text()
    assert size == html.stat().st_size and "http://" not in text and "https://" not in text  # offline
    assert text.count("data:image/jpeg;base64,") == 1  # only the script's: thumbnails are data it draws
    profile = tmp_path / "profile"
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom, dom[-2000:]

    def count(section: str) -> int:
        return int(re.search(rf'<section id="{section}"[^>]*data-count="(\d+)"', dom).group(1))

    assert count("leaks") == len(g["copies"]) == len(found["leaks"])
    assert count("label-issues") == len(found["label_issues"]) > 0
    assert count("near-duplicates") == 1 and count("classes") == 4
    assert count("outliers") == len(found["outliers"])
    label_rows = re.search(r'<section id="label-issues".*?</section>', dom, re.S).group(0).count('<tr class="row">')
    assert label_rows == min(50, len(found["label_issues"]))  # one page
    assert dom.count("data:image/jpeg;base64,") >= 2  # the real images' thumbnails, decoded once shown
    assert "no image" in dom or "svg+xml" in dom  # placeholders for the generated paths
    shot = tmp_path / "report.png"
    subprocess.run([*base, "--window-size=1200,1600", f"--screenshot={shot}", html.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000 and Image.open(shot).size == (1200, 1600)
