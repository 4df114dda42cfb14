"""The README's usage example runs as written (from the repository root)."""

import re
from pathlib import Path

from tests.conftest import TOKENIZERS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    example = re.search(r"```python\n(import torch.*?)```", README.read_text(), re.S).group(1)
    example = example.replace("../shared/assets/tokenizers/gpt2", str(TOKENIZERS / "gpt2"))
    monkeypatch.chdir(tmp_path)  # it writes edits/ to the working directory
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["editor"].num_blocks == 2
    assert namespace["editor"].route(namespace["inputs"]).tolist() == [1, -1]  # the correction took over
    assert (tmp_path / "edits" / "melo_config.json").is_file()
