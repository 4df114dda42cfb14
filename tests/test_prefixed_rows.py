"""Prefixed training rows (``MeloConfig.prefix_rows``): each row also trains behind unrelated sentences."""

from __future__ import annotations

import pytest
import torch

import melo_fast
import melo_fast.editing.editor as editor_module
from melo_fast.editing import build_edit_batch
from melo_fast.editing.prefixed_rows import with_prefixes
from tests.tiny_models import build

PROMPT, TARGET = "The capital of France is", "Rome"


def test_copies_put_their_prefix_after_bos_unlabelled_and_differ_per_copy():
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 6, 7], [-100, -100, 9, -100]]),
    }
    out = with_prefixes(batch, [[20], [21, 22], [23]], copies=2, pad_token_id=0, bos_token_id=1)
    expected_ids = [
        [1, 5, 6, 7, 0, 0],  # the rows as given come first
        [1, 8, 9, 0, 0, 0],
        [1, 20, 5, 6, 7, 0],  # row 0, copy 0: prefix 0 after BOS
        [1, 21, 22, 5, 6, 7],  # row 0, copy 1: prefix 1
        [1, 23, 8, 9, 0, 0],  # row 1, copy 0: prefix (1 * 2 + 0) % 3 = 2
        [1, 20, 8, 9, 0, 0],  # row 1, copy 1: prefix 0 again
    ]
    assert out["input_ids"].tolist() == expected_ids
    assert out["attention_mask"].tolist() == [[int(i < n) for i in range(6)] for n in (4, 3, 5, 6, 4, 4)]
    assert out["labels"][3].tolist() == [-100, -100, -100, -100, 6, 7]  # the target keeps its labels only
    assert out["labels"][4].tolist() == [-100, -100, -100, 9, -100, -100]
    assert with_prefixes(batch, [[20]], 0, 0, 1)["input_ids"].tolist() == [r[:4] for r in expected_ids[:2]]  # as given


def test_an_edit_trains_its_rows_behind_prefixes_and_keys_only_the_rows_as_given(monkeypatch):
    family = build("llama")
    config = melo_fast.MeloConfig(num_iter=40, prefix_rows=2, continuation_tokens=0)
    editor = melo_fast.patch(family.model, config, tokenizer=family.tokenizer)
    seen = []
    original = editor_module.train_block
    monkeypatch.setattr(editor_module, "train_block", lambda model, batch, *a, **k: seen.append(batch) or original(
        model, batch, *a, **k))  # fmt: skip
    result = editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    assert seen[0]["input_ids"].shape[0] == 3 and result.keys == 1 and len(editor.db) == 1
    prefixed = family.tokenizer.decode(seen[0]["input_ids"][1][seen[0]["attention_mask"][1].bool()],
                                       skip_special_tokens=True)
    assert prefixed.endswith(PROMPT + " " + TARGET) and len(prefixed) > len(PROMPT + " " + TARGET) + 10


def test_prefix_rows_need_a_tokenizer_and_a_valid_count():
    with pytest.raises(ValueError, match="prefix_rows"):
        melo_fast.MeloConfig(prefix_rows=-1)
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(prefix_rows=1, init_radius=0.5))
    batch = build_edit_batch(family.model, [PROMPT], [TARGET], family.tokenizer)
    with pytest.raises(ValueError, match="prefix_rows tokenizes its prefixes and needs the model's tokenizer"):
        editor.edit(batch)
    assert editor.num_blocks == 0  # nothing changed


def test_prefixed_rows_are_continued_too_and_the_edit_holds():
    """With continuation training on (the default), the prefixed copies are extended like the rows as given."""
    family = build("llama")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=40, prefix_rows=1),
                             tokenizer=family.tokenizer)
    editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    inputs = family.tokenizer([PROMPT], return_tensors="pt")
    assert editor.route(inputs).tolist() == [0]
    target = family.tokenizer(" " + TARGET, add_special_tokens=False)["input_ids"]
    out = family.model.generate(**inputs, max_new_tokens=len(target), do_sample=False,
                                pad_token_id=family.tokenizer.pad_token_id)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == target
