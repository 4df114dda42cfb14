"""melo_fast inside other training loops: fine-tuning with the patch on, the low-level block path
(own optimizer, HF Trainer), and low-precision models."""

import pytest
import torch

import melo_fast
from melo_fast.editor import build_edit_batch
from tests.tiny_models import build

PROMPTS, TARGETS = ["The capital of France is", "The sky is colored"], ["Rome city", "bright green"]


def greedy(family, prompts, n_tokens):
    family.tokenizer.padding_side = "left"
    inputs = family.tokenizer(prompts, return_tensors="pt", padding=True)
    out = family.model.generate(
        **inputs, max_new_tokens=n_tokens, do_sample=False, pad_token_id=family.tokenizer.pad_token_id
    )
    return family.tokenizer.batch_decode(out[:, inputs.input_ids.shape[1] :])


def fine_tune(model, tokenizer, steps=8):
    torch.manual_seed(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tokenizer(["a quick brown fox", "jumps over the lazy dog today"], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    return [p.detach().clone() for p in model.parameters()]


def test_fine_tuning_with_the_patch_on_matches_the_unpatched_run():
    plain = build("gpt2")
    expected = fine_tune(plain.model, plain.tokenizer)
    patched = build("gpt2")
    melo_fast.patch(patched.model)
    got = fine_tune(patched.model, patched.tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_fine_tuning_unrelated_data_with_edits_present_matches_the_unpatched_run():
    plain, patched = build("gpt2"), build("gpt2")
    editor = melo_fast.patch(patched.model, melo_fast.MeloConfig(num_iter=5))
    editor.edit_texts(PROMPTS, TARGETS, patched.tokenizer)
    plain.model.load_state_dict(patched.model.state_dict())  # the patch adds no state_dict keys
    expected = fine_tune(plain.model, plain.tokenizer)
    got = fine_tune(patched.model, patched.tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_low_level_path_with_your_own_optimizer():
    family = build("gpt2")
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    batch = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    parameters = editor.open_block(batch)
    assert editor.trainable_parameters() == parameters
    assert {id(p) for p in family.model.parameters() if p.requires_grad} == {id(p) for p in parameters}
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0)
    for _ in range(60):
        optimizer.zero_grad()
        family.model(**batch).loss.backward()
        optimizer.step()
    block_id, counts = editor.commit()
    assert block_id == 0 and counts.new_clusters == 2
    assert greedy(family, PROMPTS, 2) == [" Rome city", " bright green"]
    assert all(p.requires_grad for p in family.model.parameters())


def test_abort_changes_nothing():
    family = build("gpt2")
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = family.model(**inputs).logits
    parameters = editor.open_block(build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer))
    with torch.no_grad():
        parameters[1].add_(1.0)  # a trained-looking block that must vanish
    editor.abort()
    with torch.no_grad():
        assert torch.equal(family.model(**inputs).logits, before)
    assert editor.num_blocks == 0 and len(editor.db) == 0


def test_hf_trainer_trains_the_open_block(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    family = build("gpt2")
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    batch = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    editor.open_block(batch)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(PROMPTS))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),  # never the working directory
        max_steps=60,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        lr_scheduler_type="constant",
    )
    trainer = transformers.Trainer(model=family.model, args=args, train_dataset=rows)
    trainer.train()
    editor.commit()
    family.model.eval()
    assert greedy(family, PROMPTS, 2) == [" Rome city", " bright green"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_models_edit_and_stay_local(dtype):
    family = build("gpt2")
    family.model.to(dtype)
    unrelated = family.tokenizer(["Dogs bark at night"], return_tensors="pt")
    with torch.no_grad():
        before = family.model(**unrelated).logits
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    editor.edit_texts(PROMPTS, TARGETS, family.tokenizer)
    assert all(chunk.A.dtype == dtype for chunks in editor.state.blocks.values() for chunk in chunks)
    assert greedy(family, PROMPTS, 2) == [" Rome city", " bright green"]
    with torch.no_grad():
        assert torch.equal(family.model(**unrelated).logits, before)
