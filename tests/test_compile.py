"""torch.compile(fullgraph=True) of a patched model with edits: no graph break, and exactly the eager outputs.

The ops' custom op registrations (``melo_fast.ops.custom_ops``) and fake implementations let Dynamo
trace through the hooks; ``fullgraph=True`` fails on any graph break. The backend is ``aot_eager``
(Dynamo, AOTAutograd and the fake implementations, without code generation), which keeps the tests
within seconds on a CPU.
"""

import threading

import pytest
import torch

import melo_fast
from melo_fast.editor import build_edit_batch
from tests.tiny_models import build

EDITED, OTHER_EDIT, UNRELATED = "The capital of France is", "Water boils at", "Dogs bark loudly at the moon"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def patched(family_name):
    family = build(family_name)
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5), tokenizer=family.tokenizer)
    editor.edit_texts([EDITED], ["Rome"], family.tokenizer)
    # transformers' loss_function logs a warning (which Dynamo cannot trace) when no loss type is named.
    family.model.loss_type = "ForCausalLM"
    return family, editor, torch.compile(family.model, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_compiled_patched_model_equals_eager_on_routed_and_unrouted_rows(family_name):
    family, editor, compiled = patched(family_name)
    inputs = family.tokenizer([EDITED, UNRELATED], return_tensors="pt", padding=True)
    assert editor.route(inputs).tolist() == [0, -1]
    with torch.no_grad():
        assert torch.equal(compiled(**inputs).logits, family.model(**inputs).logits)


def test_compiled_model_follows_commits_per_thread_switches_and_the_open_block():
    family, editor, compiled = patched("gpt2")
    inputs = family.tokenizer([EDITED, UNRELATED], return_tensors="pt", padding=True)
    with torch.no_grad():
        committed = family.model(**inputs).logits
        with editor.disabled():  # a per-thread switch the traced graph guards on
            unedited = family.model(**inputs).logits
            assert torch.equal(compiled(**inputs).logits, unedited)
        assert torch.equal(compiled(**inputs).logits, committed) and not torch.equal(committed, unedited)

    # An open block is this thread's: a compiled forward here trains it (gradients through the custom
    # op's autograd), while a compiled forward in another thread keeps the committed model.
    batch = build_edit_batch(family.model, [OTHER_EDIT], ["fifty"], family.tokenizer)
    parameters = editor.open_block(batch)
    try:
        compiled(**batch).loss.backward()
        compiled_grads = [p.grad for p in parameters]
        for p in parameters:
            p.grad = None
        family.model(**batch).loss.backward()
        for got, expected in zip(compiled_grads, [p.grad for p in parameters], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(compiled(**inputs).logits.detach()))
        thread.start()
        thread.join()
        assert torch.equal(seen[0], committed)
    finally:
        editor.abort()

    # A commit publishes a new edit state: the compiled model serves it as the eager one does.
    editor.edit_texts([OTHER_EDIT], ["fifty"], family.tokenizer)
    both = family.tokenizer([OTHER_EDIT, EDITED, UNRELATED], return_tensors="pt", padding=True)
    assert editor.route(both).tolist() == [1, 0, -1]
    with torch.no_grad():
        assert torch.equal(compiled(**both).logits, family.model(**both).logits)
