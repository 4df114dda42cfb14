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


def test_the_layout_section_lists_the_package_as_it_is():
    """Every module of melo_fast (but eval/ and the triton kernels, described as folders) is in the README's
    layout, and everything the layout lists exists."""
    block = README.read_text().split("## Layout", 1)[1].split("```", 2)[1]
    listed, parent = set(), None
    for line in block.splitlines():
        indent, name = len(line) - len(line.lstrip()), line.strip().split(" ", 1)[0]
        if indent == 0:
            parent = name if name == "melo_fast/" else None
        elif parent and indent == 2:
            listed.add("melo_fast/" + name)
            folder = name if name.endswith("/") else None
        elif parent and indent == 4 and folder:
            listed.add("melo_fast/" + folder + name)
    root = README.parent
    assert all((root / path).exists() for path in listed), sorted(p for p in listed if not (root / p).exists())
    modules = {
        path.relative_to(root).as_posix()
        for path in (root / "melo_fast").rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "melo_fast"
    }
    described_as_folders = ("melo_fast/eval/", "melo_fast/ops/triton/")
    missing = {m for m in modules if not m.startswith(described_as_folders)} - listed
    assert not missing, sorted(missing)
