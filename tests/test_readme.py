"""The README's examples run as written. (The CLI reference lives in docs/cli.md: tests/test_cli.py.)"""

import re

from conftest import REPO, generated_images


def test_readme_python_api_runs_as_written(tmp_path, random_model, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks and "from headstart." in blocks[0]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vgg16.onnx").write_bytes(random_model.read_bytes())
    generated_images(tmp_path / "data" / "catsdogs", 12, "train", classes=("cats", "dogs"))
    generated_images(tmp_path / "data" / "catsdogs", 4, "valid", classes=("cats", "dogs"), seed=1)
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "models" / "catsdogs.head").is_file()


def test_readme_names_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "bash .ci/run" in readme and "dvc repro" in readme

