"""Routing state is per model and per thread (the concurrency tests are in test_serving.py)."""

import threading

import torch

import melo_fast
from tests.tiny_models import build


def test_disabled_applies_to_the_calling_thread_only():
    family = build("gpt2")
    edited = family.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        unedited = family.model(**edited).logits
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=20), tokenizer=family.tokenizer)
    editor.edit_texts(["The capital of France is"], ["Rome"], family.tokenizer)
    with torch.no_grad():
        expected = family.model(**edited).logits
    # Outside disabled() the edit is live: the prompt routes to its block and its logits change, so the
    # checks below cannot pass with an edit that does nothing.
    assert editor.route(edited).tolist() == [0]
    assert (expected - unedited).abs().max() > 1e-3
    seen = []
    with editor.disabled(), torch.no_grad():
        original = family.model(**edited).logits  # this thread: the unedited model, exactly
        thread = threading.Thread(target=lambda: seen.append(family.model(**edited).logits.detach()))
        thread.start()
        thread.join()
    assert torch.equal(original, unedited)
    assert torch.equal(seen[0], expected)  # another thread keeps the edit


def test_two_patched_models_do_not_interfere():
    first, second = build("gpt2"), build("gpt2")
    inputs = first.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        before = second.model(**inputs).logits
    editor = melo_fast.patch(first.model, melo_fast.MeloConfig(num_iter=20), tokenizer=first.tokenizer)
    melo_fast.patch(second.model)
    editor.edit_texts(["The capital of France is"], ["Rome"], first.tokenizer)
    with torch.no_grad():
        edited_first = first.model(**inputs).logits
        assert torch.equal(second.model(**inputs).logits, before)
        assert not torch.equal(edited_first, before)
