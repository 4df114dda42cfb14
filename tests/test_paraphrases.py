"""User-written paraphrases in the edit API: ``edit_texts(..., paraphrases=[[...], ...])``.

Every paraphrase is one more row of the same edit with its prompt's target: its key joins the
database with that edit and the block trains on it. Bad paraphrases are refused before any work.
"""

from __future__ import annotations

import pytest
import torch

import melo_fast
import melo_fast.editing.editor as editor_module
from melo_fast.editing import build_edit_batch
from tests.tiny_models import build

PROMPT, TARGET = "The capital of France is", "Rome"
PARAPHRASES = ["France's capital city is", "The French capital is"]


def _patched(name: str, **config):
    family = build(name)
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(**config), tokenizer=family.tokenizer)
    return family, editor


def _recording(monkeypatch) -> list[dict]:
    """The batches train_block is given (training still runs; patch with continuation_tokens=0 to see the
    edit batch itself rather than its extension by the model's continuation)."""
    seen = []
    original = editor_module.train_block
    monkeypatch.setattr(editor_module, "train_block", lambda model, batch, *a, **k: seen.append(batch) or original(
        model, batch, *a, **k))  # fmt: skip
    return seen


def test_paraphrases_route_to_the_edits_block_and_answer_its_target():
    family, editor = _patched("gpt2", num_iter=30)
    tokenizer = family.tokenizer
    result = editor.edit_texts([PROMPT], [TARGET], tokenizer, paraphrases=[PARAPHRASES])
    assert result.keys == 3 and len(editor.db) == 3
    target = tuple(tokenizer(" " + TARGET, add_special_tokens=False)["input_ids"])
    assert editor.db.labels == [target]
    for text in [PROMPT, *PARAPHRASES]:
        inputs = tokenizer([text], return_tensors="pt")
        assert editor.route(inputs).tolist() == [0], text
        out = family.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(out[0, -1:]) == " " + TARGET, text
    assert editor.route(tokenizer(["Dogs like to chase"], return_tensors="pt")).tolist() == [-1]


def test_without_paraphrases_the_edit_reaches_neither_of_them():
    """The same edit without them: the paraphrases are not routed to it (what the argument adds)."""
    family, editor = _patched("gpt2", num_iter=2)
    editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    probe = family.tokenizer(PARAPHRASES, return_tensors="pt", padding=True)
    assert editor.route(probe).tolist() == [-1, -1]


def test_rows_are_the_prompts_then_each_prompts_paraphrases_with_its_target(monkeypatch):
    family, editor = _patched("gpt2", num_iter=1, continuation_tokens=0)
    seen = _recording(monkeypatch)
    prompts, targets = [PROMPT, "The sky is"], [TARGET, "green"]
    paraphrases = [[PARAPHRASES[0]], ["The colour of the sky is", "Up above, the sky is"]]
    result = editor.edit_texts(prompts, targets, family.tokenizer, paraphrases=paraphrases)
    rows = [*prompts, PARAPHRASES[0], *paraphrases[1]]
    expected = build_edit_batch(family.model, rows, [*targets, TARGET, "green", "green"], family.tokenizer)
    assert all(torch.equal(seen[0][k], expected[k]) for k in expected)
    assert result.keys == 5 and len(editor.db) == 5


def test_none_is_exactly_the_batch_of_the_prompts(monkeypatch):
    family, editor = _patched("gpt2", num_iter=1, continuation_tokens=0)
    seen = _recording(monkeypatch)
    editor.edit_texts([PROMPT, "The sky is"], [TARGET, "green"], family.tokenizer, paraphrases=None)
    editor.edit_texts([PROMPT, "The sky is"], [TARGET, "green"], family.tokenizer, paraphrases=[[], []])
    plain = build_edit_batch(family.model, [PROMPT, "The sky is"], [TARGET, "green"], family.tokenizer)
    for batch in seen:
        assert batch.keys() == plain.keys()
        assert all(torch.equal(batch[k], plain[k]) for k in plain)


@pytest.mark.parametrize("paraphrases, error, message", [
    ("France's capital", TypeError, r"paraphrases must be a list .*got str"),
    ([["a"], ["b"]], ValueError, r"1 prompts but 2 paraphrase lists; give one list per prompt"),
    (["France's capital"], TypeError, r"paraphrases\[0\] has type str .*must be a list of other wordings of prompt 0"),
    ([[PARAPHRASES[0], None]], TypeError, r"paraphrases\[0\]\[1\] has type NoneType .*must be text"),
    ([[PARAPHRASES[0], "  "]], ValueError, r"paraphrases\[0\]\[1\] is '  '; every paraphrase must be non-empty"),
    ([[PROMPT]], ValueError, r"paraphrases\[0\]\[0\] .* repeats prompt 0"),
    ([[PARAPHRASES[0], PARAPHRASES[0] + " "]], ValueError, r"paraphrases\[0\]\[1\] .* repeats paraphrases\[0\]\[0\]"),
])  # fmt: skip
def test_bad_paraphrases_are_refused_before_any_work(paraphrases, error, message, monkeypatch):
    family, editor = _patched("gpt2", num_iter=1)
    tokenized = []
    monkeypatch.setattr(type(family.tokenizer), "__call__", lambda *a, **k: tokenized.append(a))
    state = editor.state
    with pytest.raises(error, match=message):
        editor.edit_texts([PROMPT], [TARGET], family.tokenizer, paraphrases=paraphrases)
    assert tokenized == [] and editor.state is state and len(editor.db) == 0 and editor.num_blocks == 0


def test_a_paraphrase_equal_to_another_prompt_is_refused_naming_both():
    family, editor = _patched("gpt2", num_iter=1)
    with pytest.raises(ValueError, match=r"paraphrases\[1\]\[0\] \('The capital of France is'\) repeats prompt 0"):
        editor.edit_texts([PROMPT, "The sky is"], [TARGET, "green"], family.tokenizer, paraphrases=[[], [PROMPT]])
    assert editor.num_blocks == 0


@pytest.mark.parametrize("name", ["t5", "bert"])
def test_seq2seq_and_classifier_edits_gain_one_row_per_paraphrase(name, monkeypatch):
    family, editor = _patched(name, num_iter=1)
    seen = _recording(monkeypatch)
    targets = [3] if name == "bert" else [TARGET]
    result = editor.edit_texts([PROMPT], targets, family.tokenizer, paraphrases=[PARAPHRASES])
    expected = build_edit_batch(family.model, [PROMPT, *PARAPHRASES], targets * 3, family.tokenizer)
    assert seen[0]["input_ids"].shape[0] == 3
    assert all(torch.equal(seen[0][k], expected[k]) for k in expected)
    assert result.keys == 3 and len(editor.db) == 3
    probe = family.tokenizer(PARAPHRASES, return_tensors="pt", padding=True)
    assert editor.route(probe).tolist() == [0, 0]
