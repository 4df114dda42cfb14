"""The README's usage examples run as written (from the repository root)."""

import re
from pathlib import Path

from tests.conftest import TOKENIZERS

README = Path(__file__).resolve().parents[1] / "README.md"


def _run_use_example(tmp_path, monkeypatch) -> dict:
    example = re.search(r"```python\n(import torch.*?)```", README.read_text(), re.S).group(1)
    example = example.replace("../shared/assets/tokenizers/gpt2", str(TOKENIZERS / "gpt2"))
    monkeypatch.chdir(tmp_path)  # it writes edits/ to the working directory
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    return namespace


def test_readme_example_runs(tmp_path, monkeypatch):
    namespace = _run_use_example(tmp_path, monkeypatch)
    assert namespace["editor"].num_blocks == 2
    assert namespace["editor"].route(namespace["inputs"]).tolist() == [1, -1]  # the correction took over
    assert (tmp_path / "edits" / "melo_config.json").is_file()


def test_readme_training_loop_runs(tmp_path, monkeypatch):
    """The "Your own training loop" snippet, continuing the usage example's namespace."""
    namespace = _run_use_example(tmp_path, monkeypatch)
    loop = re.search(r"```python\n(from melo_fast\.editor import build_edit_batch.*?)```", README.read_text(), re.S)
    exec(compile(loop.group(1), str(README), "exec"), namespace)
    editor = namespace["editor"]
    assert editor.num_blocks == 3
    assert editor.route(namespace["batch"]).tolist() == [2]  # the committed block serves its prompt
    assert editor.route(namespace["inputs"]).tolist() == [1, -1]  # earlier edits untouched
