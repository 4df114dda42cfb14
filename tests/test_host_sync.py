"""The inference forward of a patched model never synchronizes with the host (DESIGN §4).

On a GPU a ``.item()``, ``.tolist()`` or ``bool(tensor)`` stalls the stream until the device has caught
up. Those calls look the same on a CPU, so they are made to raise here, while a patched model with
edits runs, whenever melo_fast code is on the call stack: any host sync in the router, the lookup or
the block LoRA fails this test on any machine. (The model's own code is exempt: transformers' mask
helpers call ``bool(tensor)`` themselves.)
"""

import sys

import pytest
import torch

import melo_fast
from tests.tiny_models import build

PROMPTS = ["The capital of France is", "Dogs bark loudly at the moon", "Water boils at"]


def called_from_melo_fast() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("melo_fast"):
            return True
        frame = frame.f_back
    return False


def forbid_host_syncs(monkeypatch):
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def host_sync(self, *args, _name=name, _original=original, **kwargs):
            if called_from_melo_fast():
                raise AssertionError(f"host synchronization (Tensor.{_name}) in melo_fast's forward path")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, host_sync)


@pytest.mark.parametrize("backend", [None, "torch", "triton"], ids=["auto", "torch", "triton"])
@pytest.mark.parametrize("family_name", ["gpt2", "t5"])
def test_forward_with_edits_present_never_syncs(monkeypatch, backend, family_name):
    if backend == "triton":
        pytest.importorskip("triton")
    family = build(family_name)
    config = melo_fast.MeloConfig(num_iter=3, backend=backend)
    editor = melo_fast.patch(family.model, config, tokenizer=family.tokenizer)
    editor.edit_texts(PROMPTS[::2], ["Rome", "fifty"], family.tokenizer)
    family.tokenizer.padding_side = "left" if family.kind == "causal" else "right"
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    if family.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.zeros(len(PROMPTS), 2, dtype=torch.long)
    else:  # the positions generate() gives the left-padded rows, which the edits' keys were read at
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert sorted(editor.route(inputs).tolist()) == [-1, 0, 0]  # two rows really run the block LoRA
    with torch.no_grad():
        expected = family.model(**inputs).logits
        with monkeypatch.context() as patched:
            forbid_host_syncs(patched)
            got = family.model(**inputs).logits
    assert torch.equal(got, expected)
