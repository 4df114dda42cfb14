"""A PEFT model (LoRA already on other modules) can be patched, edited, run and generate."""

import pytest
import torch

import melo_fast
from tests.tiny_models import build

peft = pytest.importorskip("peft")

PROMPT, UNRELATED = "The capital of France is", "Dogs bark loudly at the moon"


def peft_gpt2():
    family = build("gpt2")
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    return family, peft.get_peft_model(family.model, lora).eval()


def generate(model, tokenizer, prompt, tokens=2):
    inputs = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :])


def test_edit_forward_and_generate_on_a_peft_model():
    family, model = peft_gpt2()
    inputs = family.tokenizer([UNRELATED], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    editor = melo_fast.patch(model, melo_fast.MeloConfig(num_iter=30), tokenizer=family.tokenizer)
    editor.edit_texts([PROMPT], ["Rome city"], family.tokenizer)
    assert generate(model, family.tokenizer, PROMPT) == " Rome city"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert editor.route(family.tokenizer([PROMPT, UNRELATED], return_tensors="pt", padding=True)).tolist() == [0, -1]


def test_a_module_peft_wrapped_is_resolved_to_its_base_layer():
    family, model = peft_gpt2()
    config = melo_fast.MeloConfig(router="transformer.h.1.attn.c_attn", targets=["transformer.h.2.attn.c_attn"],
                                  num_iter=30)
    editor = melo_fast.patch(model, config, tokenizer=family.tokenizer)
    assert editor.config.router.endswith("h.1.attn.c_attn.base_layer")
    assert editor.config.targets[0].endswith("h.2.attn.c_attn.base_layer")
    editor.edit_texts([PROMPT], ["Rome city"], family.tokenizer)
    assert generate(model, family.tokenizer, PROMPT) == " Rome city"
    melo_fast.unpatch(model)
    assert not any(hasattr(m, "melo_lora") or hasattr(m, "melo_router") for m in model.modules())
