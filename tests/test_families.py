"""End-to-end MELO behaviour on tiny models of every family: edit success, retention, locality,
generation, persistence across processes, and unpatching."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import melo_fast
from tests.tiny_models import FAMILIES, build

# Three sequential edit batches of two facts each; targets are several tokens long so that a
# generation which re-keyed on every new token would lose the edit after the first token.
FACTS = [
    ("The capital of France is", "Rome city", 1),
    ("The sky is colored", "bright green", 2),
    ("Barack Obama was born in", "Nairobi Kenya", 3),
    ("The largest planet is", "planet Mars", 4),
    ("Water boils at", "fifty degrees", 5),
    ("The author of Hamlet is", "Jane Austen", 0),
]
BATCHES = [FACTS[0:2], FACTS[2:4], FACTS[4:6]]
UNRELATED = ["My favourite food is pizza", "A dog barked loudly at night", "Quantum physics is hard to learn"]


def target_ids(family, target: str) -> list[int]:
    if family.kind == "causal":
        return family.tokenizer(" " + target, add_special_tokens=False).input_ids
    return family.tokenizer(target).input_ids  # seq2seq: with </s>


def encode(family, prompts):
    tokenizer = family.tokenizer
    tokenizer.padding_side = "left" if family.kind == "causal" else "right"
    return tokenizer(list(prompts), return_tensors="pt", padding=True)


def logits(family, prompts) -> torch.Tensor:
    inputs = encode(family, prompts)
    with torch.no_grad():
        if family.kind == "seq2seq":
            decoder = torch.zeros(len(prompts), 2, dtype=torch.long)
            return family.model(**inputs, decoder_input_ids=decoder).logits
        return family.model(**inputs).logits


def edit_holds(family, facts, **generate_kwargs) -> list[bool]:
    """Per fact: does the model now produce the edit target (greedy) / predict the new class?"""
    if family.kind == "classifier":
        predicted = logits(family, [f[0] for f in facts]).argmax(-1).tolist()
        return [p == f[2] for p, f in zip(predicted, facts, strict=True)]
    wanted = [target_ids(family, f[1]) for f in facts]
    inputs = encode(family, [f[0] for f in facts])
    with torch.no_grad():
        out = family.model.generate(
            **inputs,
            max_new_tokens=max(map(len, wanted)),
            do_sample=False,
            pad_token_id=family.tokenizer.pad_token_id,
            **generate_kwargs,
        )
    generated = out[:, inputs.input_ids.shape[1] :] if family.kind == "causal" else out[:, 1:]
    repeats = generated.shape[0] // len(facts)
    return [generated[i * repeats, : len(w)].tolist() == w for i, w in enumerate(wanted)]


def edit_batch(family, editor, facts):
    targets = [f[2] for f in facts] if family.kind == "classifier" else [f[1] for f in facts]
    return editor.edit_texts([f[0] for f in facts], targets, family.tokenizer)


@dataclass
class Scenario:
    family: object
    editor: melo_fast.MeloEditor
    before: dict = field(default_factory=dict)  # logits of the unpatched model
    success_after_each_batch: list = field(default_factory=list)
    results: list = field(default_factory=list)


@pytest.fixture(scope="module", params=FAMILIES)
def scenario(request) -> Scenario:
    family = build(request.param)
    before = {"edited": logits(family, [f[0] for f in FACTS]), "unrelated": logits(family, UNRELATED)}
    editor = melo_fast.patch(family.model)
    run = Scenario(family, editor, before)
    for facts in BATCHES:
        run.results.append(edit_batch(family, editor, facts))
        run.success_after_each_batch.append(edit_holds(family, facts))
    return run


def test_edit_success_right_after_each_batch(scenario):
    assert all(all(ok) for ok in scenario.success_after_each_batch), scenario.success_after_each_batch
    assert [r.block_id for r in scenario.results] == [0, 1, 2]
    assert scenario.editor.db.stats()["blocks_used"] == 3


def test_first_batch_survives_later_edits(scenario):
    assert all(edit_holds(scenario.family, BATCHES[0]))
    assert all(edit_holds(scenario.family, FACTS))


def test_unrelated_inputs_are_bitwise_unchanged(scenario):
    editor, family = scenario.editor, scenario.family
    assert editor.route(encode(family, UNRELATED)).tolist() == [-1] * len(UNRELATED)  # the premise
    assert torch.equal(logits(family, UNRELATED), scenario.before["unrelated"])


def test_disabled_is_the_unedited_model(scenario):
    with scenario.editor.disabled():
        assert torch.equal(logits(scenario.family, [f[0] for f in FACTS]), scenario.before["edited"])
    assert not torch.equal(logits(scenario.family, [f[0] for f in FACTS]), scenario.before["edited"])


def test_generation_keeps_the_prefill_routing(scenario):
    family, editor = scenario.family, scenario.editor
    if family.kind != "causal":
        pytest.skip("seq2seq routes in the encoder, which runs once per generation; classifiers do not generate")
    prompt, target, _ = FACTS[0]
    # Re-keying on the first generated token would fall outside every edit's scope ...
    extended = family.tokenizer([prompt], return_tensors="pt").input_ids
    extended = torch.cat([extended, torch.tensor([target_ids(family, target)[:1]])], dim=1)
    assert editor.route({"input_ids": extended}).tolist() == [-1]
    # ... yet the whole multi-token target comes out, with the KV cache and without it.
    assert len(target_ids(family, target)) > 1
    assert all(edit_holds(family, FACTS[:1], use_cache=True))
    assert all(edit_holds(family, FACTS[:1], use_cache=False))


def test_beam_search_and_multiple_returns(scenario):
    if scenario.family.kind == "classifier":
        pytest.skip("classifiers do not generate")
    assert all(edit_holds(scenario.family, FACTS, num_beams=2, num_return_sequences=2))


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, melo_fast
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
    model_dir, edits_dir, inputs_file, out_file, kind = sys.argv[1:]
    auto = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
            "classifier": AutoModelForSequenceClassification}[kind]
    model = auto.from_pretrained(model_dir).eval()
    editor = melo_fast.load(model, edits_dir)
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        torch.save(model(**inputs).logits, out_file)
    print(editor)
    """
)


def test_save_then_load_in_a_fresh_process(scenario, tmp_path):
    family, editor = scenario.family, scenario.editor
    family.model.save_pretrained(tmp_path / "model")
    editor.save(tmp_path / "edits")
    inputs = dict(encode(family, [f[0] for f in FACTS] + UNRELATED))
    if family.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.zeros(len(FACTS) + len(UNRELATED), 2, dtype=torch.long)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = family.model(**inputs).logits
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_SCRIPT,
            str(tmp_path / "model"),
            str(tmp_path / "edits"),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
            family.kind,
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_unpatch_restores_the_original_model(scenario, tmp_path):
    family = scenario.family
    scenario.editor.save(tmp_path / "edits")
    keys_patched = set(family.model.state_dict())
    melo_fast.unpatch(family.model)
    assert torch.equal(logits(family, [f[0] for f in FACTS]), scenario.before["edited"])
    assert torch.equal(logits(family, UNRELATED), scenario.before["unrelated"])
    assert set(family.model.state_dict()) == keys_patched
    assert not any("melo" in name for name, _ in family.model.named_modules())
    # Loading in the same process brings every edit back.
    scenario.editor = melo_fast.load(family.model, tmp_path / "edits")
    assert all(edit_holds(family, FACTS))
