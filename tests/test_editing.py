"""The editing side's pieces: the edit batch object, the training loop of one block, and closing an editor."""

import pytest
import torch

import melo_fast
from melo_fast.config import MeloConfig
from melo_fast.editing import EditBatch, build_edit_batch
from melo_fast.editing.training import model_loss, train_block
from melo_fast.targets import ModelKind
from tests.tiny_models import build


@pytest.fixture(scope="module")
def gpt2():
    return build("gpt2")


def test_an_edit_batch_from_text_holds_the_inputs_and_each_rows_target(gpt2):
    batch = EditBatch.from_texts(gpt2.model, ["The sky is", "Dogs bark at"], ["blue", "the moon"], gpt2.tokenizer)
    assert batch.kind == ModelKind(causal_lm=True, seq2seq=False) and batch.size == 2
    expected = [tuple(gpt2.tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in ("blue", "the moon")]
    assert batch.targets == expected
    plain = build_edit_batch(gpt2.model, ["The sky is", "Dogs bark at"], ["blue", "the moon"], gpt2.tokenizer)
    assert type(plain) is dict and plain.keys() == batch.inputs.keys()
    assert all(torch.equal(plain[k], batch.inputs[k]) for k in plain)
    from melo_fast.editor import build_edit_batch as readme_path

    assert readme_path is build_edit_batch


def test_targets_of_classifier_and_seq2seq_batches():
    classifier = EditBatch({"labels": torch.tensor([3, 0])}, ModelKind(causal_lm=False, seq2seq=False))
    assert classifier.targets == [(3,), (0,)]
    seq2seq = EditBatch({"labels": torch.tensor([[5, 6, -100], [7, -100, -100]])}, ModelKind(False, True))
    assert seq2seq.targets == [(5, 6), (7,)]


def test_check_refuses_what_the_model_kind_cannot_train_on(gpt2):
    batch = build_edit_batch(gpt2.model, ["The sky is"], ["blue"], gpt2.tokenizer)
    causal = ModelKind.of(gpt2.model)
    assert EditBatch.check(batch, causal, torch.device("cpu")).size == 1
    with pytest.raises(ValueError, match="causal-LM labels must have input_ids' shape"):
        EditBatch.check({**batch, "labels": batch["labels"][:, :1]}, causal, torch.device("cpu"))
    with pytest.raises(ValueError, match="is on cpu but the model is on meta"):
        EditBatch.check(batch, causal, torch.device("meta"))
    with pytest.raises(TypeError, match="the dict the model takes"):
        EditBatch.check(list(batch.values()), causal, torch.device("cpu"))


def test_the_training_loop_of_one_block_trains_only_what_it_is_given(gpt2):
    editor = melo_fast.patch(gpt2.model, MeloConfig(init_radius=1.0))
    try:
        batch = build_edit_batch(gpt2.model, ["The sky is"], ["blue"], gpt2.tokenizer)
        parameters = editor.open_block(batch)
        own = [p for p in gpt2.model.parameters() if all(p is not q for q in parameters)]  # the block is a child
        model_before = [p.detach().clone() for p in own]
        block_before = [p.detach().clone() for p in parameters]
        with torch.no_grad():
            loss_before = model_loss(gpt2.model, batch).item()
        trained = train_block(gpt2.model, batch, parameters, MeloConfig(num_iter=20).train_settings)
        with torch.no_grad():
            assert model_loss(gpt2.model, batch).item() < loss_before and trained.loss < loss_before
        assert all(torch.equal(a, b) for a, b in zip(model_before, own, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(block_before, parameters, strict=True))
        editor.abort()
    finally:
        melo_fast.unpatch(gpt2.model)


def test_close_takes_off_everything_patch_attached(gpt2):
    inputs = gpt2.tokenizer(["The sky is"], return_tensors="pt")
    with torch.no_grad():
        before = gpt2.model(**inputs).logits
    editor = melo_fast.patch(gpt2.model, MeloConfig(init_radius=1.0, num_iter=3))
    editor.edit_texts(["The sky is"], ["blue"], gpt2.tokenizer)
    editor.close()
    assert not any(hasattr(m, "melo_lora") or hasattr(m, "melo_router") for m in gpt2.model.modules())
    assert getattr(gpt2.model, "_melo_editor", None) is None and "generate" not in vars(gpt2.model)
    with torch.no_grad():
        assert torch.equal(gpt2.model(**inputs).logits, before)
    with pytest.raises(RuntimeError, match="closed"):
        editor.close()
    with pytest.raises(RuntimeError, match="not patched"):
        melo_fast.unpatch(gpt2.model)
