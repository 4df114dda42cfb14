"""``melo_fast.patch(model)`` with no module names, on every family the structural rule covers (issue 10).

For each family, at tiny size: the router and targets the rule picks (pinned below, so a change of
the rule shows up here), one edit that gives its target (greedy generation, or the argmax class),
unrelated inputs routed to no edit with logits (and generations) bitwise those of the unpatched model.
Only ``num_iter`` is passed: router, targets and radius are the defaults under test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import melo_fast
from melo_fast.targets import choose_modules
from tests.test_families import edit_batch, edit_holds, encode, logits
from tests.tiny_models import ALL_FAMILIES, build

# Fewer steps than MELO's 50 keep the file fast; every family below reaches its target within them.
EDIT_CONFIG = dict(num_iter=30)
FACT = ("The capital of France is", "Rome city", 3)  # prompt, generated target, class for classifiers
UNRELATED = ["My favourite food is pizza", "A dog barked loudly at night", "Quantum physics is hard to learn"]

# The rule's choice per family, as module-name patterns ({} = block index): the router is the first
# pattern in block 1 (2*4//3 - 1 of 4 layers), the targets every pattern in blocks 2 and 3.
EXPECTED = {
    "gpt2": ["transformer.h.{}.mlp.c_fc"],
    "gpt_neo": ["transformer.h.{}.mlp.c_fc"],
    "gptj": ["transformer.h.{}.mlp.fc_in"],
    "gpt_neox": ["gpt_neox.layers.{}.mlp.dense_h_to_4h"],
    "opt": ["model.decoder.layers.{}.fc1"],
    "bloom": ["transformer.h.{}.mlp.dense_h_to_4h"],
    "falcon": ["transformer.h.{}.mlp.dense_h_to_4h"],
    "llama": ["model.layers.{}.mlp.up_proj"],
    "mistral": ["model.layers.{}.mlp.up_proj"],
    "mixtral": ["model.layers.{}.self_attn.o_proj"],  # MoE without a shared expert
    "qwen2": ["model.layers.{}.mlp.up_proj"],
    "qwen2_moe": ["model.layers.{}.mlp.shared_expert.up_proj"],
    "qwen3": ["model.layers.{}.mlp.up_proj"],
    "qwen3_moe": ["model.layers.{}.self_attn.o_proj"],  # MoE without a shared expert
    "gemma": ["model.layers.{}.mlp.up_proj"],
    "gemma2": ["model.layers.{}.mlp.up_proj"],
    "gemma3": ["model.layers.{}.mlp.up_proj"],
    "phi": ["model.layers.{}.mlp.fc1"],
    "phi3": ["model.layers.{}.mlp.gate_up_proj"],  # fused gate + up
    "stablelm": ["model.layers.{}.mlp.up_proj"],
    "olmo": ["model.layers.{}.mlp.up_proj"],
    "olmo2": ["model.layers.{}.mlp.up_proj"],
    "granite": ["model.layers.{}.mlp.up_proj"],
    "starcoder2": ["model.layers.{}.mlp.c_fc"],
    "t5": ["encoder.block.{}.layer.1.DenseReluDense.wo", "decoder.block.{}.layer.2.DenseReluDense.wo"],
    "bart": ["model.encoder.layers.{}.fc2", "model.decoder.layers.{}.fc2"],
    "bert": ["bert.encoder.layer.{}.output.dense"],
    "roberta": ["roberta.encoder.layer.{}.output.dense"],
    "distilbert": ["distilbert.transformer.layer.{}.ffn.lin2"],
    "electra": ["electra.encoder.layer.{}.output.dense"],
    "deberta-v2": ["deberta.encoder.layer.{}.output.dense"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy 2-core machine the threads
    wait on each other: measured 6.6 s for the bert case with 2 threads under load, 0.4 s with one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def greedy(family, prompts, max_new_tokens=3):
    inputs = encode(family, prompts)
    with torch.no_grad():
        return family.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=family.tokenizer.pad_token_id
        )


def test_every_listed_family_is_tested():
    assert sorted(EXPECTED) == sorted(ALL_FAMILIES)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_default_patch_edits_one_fact_and_leaves_unrelated_inputs_bitwise(name):
    family = build(name)
    generates = family.kind != "classifier"
    before = logits(family, UNRELATED)
    generated_before = greedy(family, UNRELATED) if generates else None

    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(**EDIT_CONFIG))
    patterns = EXPECTED[name]
    assert editor.config.router == patterns[0].format(1)
    assert list(editor.config.targets) == [pattern.format(i) for pattern in patterns for i in (2, 3)]

    edit_batch(family, editor, [FACT])
    assert editor.route(encode(family, [FACT[0]])).tolist() == [0]
    assert all(edit_holds(family, [FACT])), f"{name}: the edit does not give its target"  # generate() if it can

    assert editor.route(encode(family, UNRELATED)).tolist() == [-1] * len(UNRELATED)  # the premise
    assert torch.equal(logits(family, UNRELATED), before)
    if generates:
        assert torch.equal(greedy(family, UNRELATED), generated_before)


def test_choice_reports_layers_key_width_and_why():
    family = build("qwen2_moe")
    choice = choose_modules(family.model)
    assert [(s.path, s.num_blocks, s.role) for s in choice.stacks] == [("model.layers", 4, "decoder-only")]
    assert choice.key_width == 128  # shared expert's intermediate width
    text = choice.describe()
    for expected in ("model.layers (4 layers, decoder-only)", "key width: 128", "shared expert", "is_causal=True"):
        assert expected in text


def test_a_model_where_nothing_fits_gets_the_candidate_modules():
    class AttentionOnly(nn.Module):  # projections, but no MLP (nothing maps back to the input width)
        def __init__(self):
            super().__init__()
            self.query, self.key = nn.Linear(8, 4), nn.Linear(8, 4)

    model = nn.Module()
    model.layers = nn.ModuleList([AttentionOnly(), AttentionOnly()])
    with pytest.raises(ValueError, match=r"AttentionOnly has no MLP output projection.*candidate.*layers\.0\.query"):
        melo_fast.patch(model)
