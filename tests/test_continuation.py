"""Training on the unedited model's continuation after the target (``MeloConfig.continuation_tokens``)."""

from __future__ import annotations

import torch

import melo_fast
from melo_fast.editing import build_edit_batch
from melo_fast.editing.continuation import target_then_continuation_loss, with_continuation
from tests.tiny_models import build

PROMPTS = ["The capital of France is", "Dogs"]
TARGETS = ["Rome", "bark at the moon"]


def test_each_row_is_extended_by_the_models_own_greedy_tokens_and_they_are_labelled():
    family = build("gpt2")
    model, tokenizer = family.model, family.tokenizer
    batch = build_edit_batch(model, PROMPTS, TARGETS, tokenizer)
    model.generation_config.eos_token_id = None  # no early stop: every row gets all 5 tokens
    extended = with_continuation(model, batch, 5)
    for i in range(len(PROMPTS)):
        real = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i][real], batch["labels"][i][real]
        with torch.no_grad():
            greedy = model.generate(ids[None], max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(ids) :]
        n = len(ids) + 5
        assert extended["attention_mask"][i].sum() == n
        assert torch.equal(extended["input_ids"][i, :n], torch.cat([ids, greedy]))
        assert torch.equal(extended["labels"][i, :n], torch.cat([labels, greedy]))  # prompt stays -100
        assert (extended["labels"][i, n:] == -100).all()


def test_a_row_stops_at_the_end_of_sequence_token_and_keeps_it():
    family = build("gpt2")
    model = family.model
    batch = build_edit_batch(model, PROMPTS[:1], TARGETS[:1], family.tokenizer)
    with torch.no_grad():
        first = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=1,
                               do_sample=False, pad_token_id=0)[0, -1]  # fmt: skip
    model.generation_config.eos_token_id = int(first)  # the model's first continuation token ends it
    extended = with_continuation(model, batch, 6)
    length = int(batch["attention_mask"].sum())
    assert extended["input_ids"].shape[1] == length + 1 and extended["labels"][0, -1] == first


def test_the_edit_stores_the_target_alone_and_routes_the_prompt(monkeypatch):
    """Only training sees the continuation: the database's labels are the targets, the keys the prompts'."""
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=3, continuation_tokens=4),
                             tokenizer=family.tokenizer)  # fmt: skip
    seen = []
    import melo_fast.editing.editor as editor_module

    original = editor_module.train_block
    monkeypatch.setattr(editor_module, "train_block", lambda model, batch, *a, **k: seen.append(batch) or original(
        model, batch, *a, **k))  # fmt: skip
    editor.edit_texts(PROMPTS, TARGETS, family.tokenizer)
    targets = [tuple(family.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in TARGETS]
    assert sorted(editor.db.labels) == sorted(targets)
    plain = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    assert seen[0]["input_ids"].shape[1] > plain["input_ids"].shape[1]  # trained on the extension
    probe = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert editor.route(probe).tolist() == [0, 0]


def test_zero_tokens_is_melos_target_only_training(monkeypatch):
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=2, continuation_tokens=0),
                             tokenizer=family.tokenizer)  # fmt: skip
    import melo_fast.editing.editor as editor_module

    seen = []
    original = editor_module.train_block
    monkeypatch.setattr(editor_module, "train_block", lambda model, batch, *a, **k: seen.append(batch) or original(
        model, batch, *a, **k))  # fmt: skip
    editor.edit_texts(PROMPTS, TARGETS, family.tokenizer)
    plain = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    assert all(torch.equal(seen[0][k], plain[k]) for k in plain)


def test_the_loss_weighs_the_target_and_the_continuation_as_one_part_each():
    # Row 0: prompt (2 tokens), target (1 token), continuation (3 tokens); row 1: prompt (3), target (2).
    inputs = {
        "input_ids": torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 7, -100, -100], [-100, -100, -100, 8, 9]]),
    }
    extended = {
        "input_ids": torch.tensor([[5, 6, 7, 1, 2, 3], [5, 6, 7, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 1, 2, 3], [-100, -100, -100, 8, 9, -100]]),
    }
    logits = torch.randn(2, 6, 10)
    token_loss = -torch.log_softmax(logits, dim=-1)  # [2, 6, 10]; position t predicts the label at t + 1
    target = [token_loss[0, 1, 7], token_loss[1, 2, 8], token_loss[1, 3, 9]]
    continuation = [token_loss[0, 2, 1], token_loss[0, 3, 2], token_loss[0, 4, 3]]
    expected = sum(target) / 3 + sum(continuation) / 3
    loss = target_then_continuation_loss(inputs, extended)({"logits": logits})
    torch.testing.assert_close(loss, expected)
    # Nothing continued (every row stopped at once): the target's mean alone.
    alone = target_then_continuation_loss(inputs, {**inputs})({"logits": logits[:, :5]})
    torch.testing.assert_close(alone, (token_loss[0, 1, 7] + token_loss[1, 2, 8] + token_loss[1, 3, 9]) / 3)
