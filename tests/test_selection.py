"""One task selection: --exclude and --relabel leave rows out and change labels in training, are recorded in the
head file so evaluate scores the same rows and labels, and never touch the cache."""

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import generated_images

from headstart.heads import load_head
from headstart.pipeline.cache import FeatureCache
from headstart.pipeline.cli import main
from headstart.pipeline.extract import extract
from headstart.pipeline.selection import Selection, read_exclude, read_relabel, task_rows


@pytest.fixture(scope="module")
def cache(random_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    generated_images(root / "d", 10, "train")
    generated_images(root / "d", 5, "valid", seed=1)
    extract(root / "d", random_model, root / "c.zarr", progress=False)
    return root / "c.zarr"


def fingerprint_of(folder):
    """Every file under `folder` with its bytes' hash and its modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train(cache, out, *args):
    return CliRunner().invoke(main, ["train", "--cache", str(cache), "--head", "logistic", "-o", str(out), *args])


def test_exclude_leaves_rows_out_of_training_and_scoring_and_names_an_entry_matching_nothing(cache, tmp_path):
    fc = FeatureCache(cache)
    train_rows = np.flatnonzero(fc.splits == "train")
    by_tail = fc.paths[train_rows[0]].split("/d/", 1)[1]  # train/a/a.0.0.jpg, as the user sees it in the folder
    by_hash = fc.hashes[train_rows[-1]]
    valid_path = fc.paths[np.flatnonzero(fc.splits == "valid")[0]]
    (tmp_path / "exclude.txt").write_text(f"# suspects\n\n{by_tail}\n{by_hash}  # a mislabelled one\n"
                                          f"{valid_path}\nnot/there.jpg\n")
    before = fingerprint_of(cache)
    result = train(cache, tmp_path / "h.head", "--exclude", str(tmp_path / "exclude.txt"))
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'exclude.txt'}:6: not/there.jpg matches no row" in result.output
    head = load_head(tmp_path / "h.head")
    assert head.meta_["rows"] == {"train": 18, "valid": 9}
    assert head.meta_["selection"]["exclude"] == [by_tail, by_hash, valid_path, "not/there.jpg"]
    assert fingerprint_of(cache) == before  # the cache is untouched

    scored = CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--head-file", str(tmp_path / "h.head"),
                                       "--json", "-"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["n"] == 9  # the head's own exclusions: the excluded valid image is not scored
    (tmp_path / "none.txt").write_text("# nothing\n")
    scored = CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--head-file", str(tmp_path / "h.head"),
                                       "--exclude", str(tmp_path / "none.txt"), "--json", "-"])
    assert json.loads(scored.stdout)["n"] == 10  # its own list replaces the head's


def test_relabel_trains_under_the_new_labels_and_evaluate_scores_under_them(cache, tmp_path):
    fc = FeatureCache(cache)
    swapped = "\n".join(f"{p},{'b' if fc.classes[y] == 'a' else 'a'}" for p, y in zip(fc.paths, fc.labels,
                                                                                         strict=True))
    (tmp_path / "relabel.csv").write_text("path,label\n" + swapped + "\n")
    before = fingerprint_of(cache)
    assert train(cache, tmp_path / "plain.head").exit_code == 0
    result = train(cache, tmp_path / "swapped.head", "--relabel", str(tmp_path / "relabel.csv"))
    assert result.exit_code == 0, result.output
    assert fingerprint_of(cache) == before
    plain, relabelled = load_head(tmp_path / "plain.head"), load_head(tmp_path / "swapped.head")
    X = fc.features("gap")
    assert (plain.predict(X) == np.array(fc.classes)[fc.labels]).mean() > 0.9
    assert (relabelled.predict(X) != plain.predict(X)).mean() > 0.9  # it learnt the swapped labels

    def accuracy(head, *args):
        out = CliRunner().invoke(main, ["evaluate", "--cache", str(cache), "--head-file", str(head), "--json", "-",
                                        *args])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)["accuracy"]

    assert accuracy(tmp_path / "swapped.head") > 0.9  # scored under the labels it was trained for
    (tmp_path / "empty.csv").write_text("path,label\n")
    assert accuracy(tmp_path / "swapped.head", "--relabel", str(tmp_path / "empty.csv")) < 0.1  # the cache's labels


def test_a_bad_relabel_line_is_a_one_line_error_naming_it(cache, tmp_path):
    fc = FeatureCache(cache)
    relabel = tmp_path / "relabel.csv"
    for text, expected in [(f"{fc.paths[0]},b\n{fc.paths[1]},zebra\n", f"{relabel}:2: label 'zebra' of"),
                           (f"{fc.paths[0]},b\nelsewhere/x.jpg,a\n", f"{relabel}:2: elsewhere/x.jpg is not a path"),
                           ("path,label\na.jpg\n", f"{relabel}:2: expected 'path,label'")]:
        relabel.write_text(text)
        result = train(cache, tmp_path / "h.head", "--relabel", str(relabel))
        assert result.exit_code == 1 and expected in result.output, result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "h.head").exists()


def test_entries_match_a_stored_path_or_its_tail_and_files_are_read_as_documented(cache, tmp_path):
    (tmp_path / "r.csv").write_text("a.0.0.jpg,b\n")  # train/a/a.0.0.jpg only: valid images have seed 1
    (tmp_path / "e.txt").write_text("  # note\nx#1.jpg\n\ny.jpg # why\n")
    assert read_exclude(tmp_path / "e.txt") == (("x#1.jpg", "y.jpg"), {"x#1.jpg": f"{tmp_path / 'e.txt'}:2",
                                                                       "y.jpg": f"{tmp_path / 'e.txt'}:4"})
    relabel, origin = read_relabel(tmp_path / "r.csv")
    fc = FeatureCache(cache)
    classes, y, record, train_rows, _ = task_rows(fc, Selection(relabel=relabel, origin=origin))
    changed = np.flatnonzero(y != fc.labels)
    assert [fc.paths[i].rsplit("/", 2)[-2:] for i in changed] == [["a", "a.0.0.jpg"]]
    assert y[changed[0]] == classes.index("b") and record["relabel"] == {"a.0.0.jpg": "b"}
    with pytest.raises(ValueError, match="0.jpg is not a path"):  # a tail is whole path components
        task_rows(fc, Selection(relabel={"0.jpg": "a"}))
