"""The frozen prefix (blocks below the first target computed once per edit batch) and the early stop.

The prefix replay must be exact: a block trained with it equals the block trained without it, for a
decoder-only model, an encoder-decoder and an encoder, and the frozen blocks must really not be
recomputed. Where it cannot apply it must fall back to the full forward, never train a wrong block.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import melo_fast
from melo_fast.editing import build_edit_batch
from melo_fast.editing.convergence import targets_predicted
from melo_fast.editing.frozen_prefix import FrozenPrefix
from melo_fast.targets import SUPPORTED_TYPES, block_lists
from tests.tiny_models import build

PROMPTS = ["The capital of France is", "The sky is"]


def _targets(family):
    return ["Rome", "green"] if family.kind != "classifier" else [1, 2]


def _edit(name: str, **config):
    """Edit a fresh tiny model of family ``name``; returns (family, editor, result, calls of block 0)."""
    family = build(name)
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(**config), tokenizer=family.tokenizer)
    first_block = block_lists(family.model)[0][0]
    calls = []
    # A replayed block is still called, but computes nothing: count the calls of its first projection.
    first_projection = next(m for m in first_block.modules() if isinstance(m, SUPPORTED_TYPES))
    handles = [first_projection.register_forward_pre_hook(lambda *_: calls.append(1))]
    torch.manual_seed(1)
    result = editor.edit_texts(PROMPTS, _targets(family), family.tokenizer)
    for handle in handles:
        handle.remove()
    return family, editor, result, len(calls)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bert"])
def test_block_trained_with_the_frozen_prefix_equals_the_block_trained_without(name):
    steps = dict(num_iter=8, stop_loss=None)
    _, plain_editor, plain, plain_calls = _edit(name, cache_frozen_prefix=False, **steps)
    family, editor, cached, cached_calls = _edit(name, cache_frozen_prefix=True, **steps)
    assert cached.steps == plain.steps == 8
    assert cached.loss == pytest.approx(plain.loss, rel=1e-6)
    for (A, B), (plain_A, plain_B) in zip(editor.blocks().values(), plain_editor.blocks().values(), strict=True):
        torch.testing.assert_close(A, plain_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, plain_B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(editor.db.points, plain_editor.db.points)
    # Block 0 lies below every target: without the cache it runs at every step (and for the key scale
    # and the keys), with it only in the first step (recorded).
    assert plain_calls - cached_calls == 7
    probe = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert editor.route(probe).tolist() == plain_editor.route(probe).tolist() == [0, 0]


def test_frozen_blocks_are_not_recomputed_after_the_first_step(caplog):
    family = build("gpt2")  # 4 blocks: router in block 1, targets in blocks 2 and 3
    # No continuation: its greedy generation runs block 0 too, and this test counts training's forwards.
    config = melo_fast.MeloConfig(num_iter=6, stop_loss=None, continuation_tokens=0)
    editor = melo_fast.patch(family.model, config, tokenizer=family.tokenizer)
    editor.calibrate()
    computed = []
    handle = block_lists(family.model)[0][0].mlp.register_forward_hook(lambda *_: computed.append(1))
    with caplog.at_level(logging.DEBUG, logger="melo_fast.editing.frozen_prefix"):
        result = editor.edit_texts(PROMPTS, _targets(family), family.tokenizer)
    handle.remove()
    assert result.steps == 6
    assert "replaying 2 frozen blocks" in caplog.text
    assert len(computed) == 2  # the key read and the recorded first step; none of the five later steps


def test_a_target_in_the_first_block_trains_with_the_full_forward(caplog):
    family = build("gpt2")
    config = melo_fast.MeloConfig(router="h.0.mlp.c_fc", targets=["h.0.mlp.c_proj", "h.1.mlp.c_fc"], num_iter=4)
    editor = melo_fast.patch(family.model, config, tokenizer=family.tokenizer)
    with caplog.at_level(logging.DEBUG, logger="melo_fast.editing.frozen_prefix"):
        editor.edit_texts(PROMPTS, _targets(family), family.tokenizer)
    assert "no block finishes before the first target starts" in caplog.text


def test_a_block_that_modifies_a_recorded_output_in_place_stops_the_replay(caplog):
    """A block above the prefix that writes into its input would change the recording: from that step on
    the full forward runs, and the block equals the one trained without the cache."""
    results = {}
    for cache in (False, True):
        family = build("llama")
        blocks = block_lists(family.model)[0]
        forward = blocks[2].forward  # the first block above the prefix (targets in blocks 2 and 3)

        def touching(hidden_states, *args, _forward=forward, **kwargs):
            hidden_states.mul_(1.0)  # same values, but an in-place write: its version counter moves
            return _forward(hidden_states, *args, **kwargs)

        blocks[2].forward = touching
        config = melo_fast.MeloConfig(num_iter=5, stop_loss=None, cache_frozen_prefix=cache)
        editor = melo_fast.patch(family.model, config, tokenizer=family.tokenizer)
        torch.manual_seed(1)
        with caplog.at_level(logging.DEBUG, logger="melo_fast.editing.frozen_prefix"):
            editor.edit_texts(PROMPTS, _targets(family), family.tokenizer)
        results[cache] = editor.blocks()
    assert "modified in place" in caplog.text
    for name, (A, B) in results[True].items():
        torch.testing.assert_close(A, results[False][name][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, results[False][name][1], rtol=1e-5, atol=1e-6)


def test_other_threads_run_the_real_blocks_while_the_prefix_is_replayed():
    family = build("llama")
    model = family.model
    batch = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    other = family.tokenizer(["Dogs bark at night", "Water boils"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**other).logits
    targets = [module for name, module in model.named_modules() if name.endswith("layers.2.mlp.up_proj")]
    trainer = threading.get_ident()
    prefix = FrozenPrefix(
        model, targets, lambda: model(**batch, labels=batch["input_ids"]), lambda out: out.loss,
        lambda: threading.get_ident() == trainer,
    )
    seen = {}
    with torch.no_grad(), prefix:
        prefix.step()
        assert prefix.replayed == 2
        prefix.step()  # replayed in this thread

        def serve():
            seen["logits"] = model(**other).logits

        thread = threading.Thread(target=serve)
        thread.start()
        thread.join()
    torch.testing.assert_close(seen["logits"], expected)
    assert "forward" not in block_lists(model)[0][0].__dict__  # the instance-level replay is removed


def test_early_stop_ends_the_edit_once_the_targets_are_predicted():
    family, editor, result, _ = _edit("bert", num_iter=50)  # tiny random LMs rarely reach 0.05 in 50 steps
    assert 1 <= result.steps < 50 and result.loss < editor.config.stop_loss
    batch = build_edit_batch(family.model, PROMPTS, _targets(family), family.tokenizer)
    with torch.no_grad():
        logits = family.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert targets_predicted(logits, batch["labels"], causal_lm=False)
    _, _, fixed, _ = _edit("bert", num_iter=12, stop_loss=None)
    assert fixed.steps == 12  # MELO's fixed loop: one setting away


def test_targets_predicted_by_hand():
    # Causal LM: the logits at position t predict the label at t + 1.
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]]])  # argmax 1, 2, 0
    assert targets_predicted(logits, torch.tensor([[-100, 1, 2]]), causal_lm=True)
    assert not targets_predicted(logits, torch.tensor([[-100, 1, 0]]), causal_lm=True)
    assert targets_predicted(logits, torch.tensor([[-100, -100, 2]]), causal_lm=True)  # -100 is not checked
    # Seq2seq decoder: aligned positions.
    assert targets_predicted(logits, torch.tensor([[1, 2, 0]]), causal_lm=False)
    assert not targets_predicted(logits, torch.tensor([[1, 2, 2]]), causal_lm=False)
    # Classifier: [N, C] logits, [N] class ids.
    assert targets_predicted(torch.tensor([[0.1, 0.9], [2.0, 1.0]]), torch.tensor([1, 0]), causal_lm=False)
    with pytest.raises(ValueError, match="do not line up"):
        targets_predicted(logits, torch.tensor([[1, 2]]), causal_lm=False)
