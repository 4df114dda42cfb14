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


EDITED = "The capital of France is"
LONGER = "Dogs bark loudly at the moon on every single night"  # so the edited prompt gets left padding


def left_padded(family, prompts):
    family.tokenizer.padding_side = "left"
    return dict(family.tokenizer(prompts, return_tensors="pt", padding=True))


def routed_by_forward(family, editor, inputs):
    """The block ids a plain forward call of this thread used, and its logits."""
    with torch.no_grad():
        logits = family.model(**inputs).logits
    return editor.routing.call.block_ids.tolist(), logits


def position_warnings(record):
    return [w for w in record if "position" in str(w.message)]


def test_route_and_a_plain_forward_agree_on_left_padded_batches_and_say_once_how_to_match_generate(recwarn):
    """GPT-2 has absolute positions: without position_ids a left-padded row sits at shifted positions, in
    route() as in the model's own forward; generate() derives them from the mask, and so does route() when
    it is given the same position_ids."""
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=20), tokenizer=family.tokenizer)
    editor.edit_texts([EDITED], ["Rome"], family.tokenizer)
    inputs = left_padded(family, [EDITED, LONGER])
    assert not position_warnings(recwarn)
    routed = editor.route(inputs).tolist()
    (warning,) = position_warnings(recwarn)
    assert "position_ids" in str(warning.message) and "cumsum" in str(warning.message)
    forward_ids, _ = routed_by_forward(family, editor, inputs)
    assert routed == forward_ids and routed[1] == -1
    assert editor.adapter_names(inputs) == ["block_0000" if b == 0 else "__base__" for b in routed]

    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with_positions = {**inputs, "position_ids": positions}
    assert editor.route(with_positions).tolist() == routed_by_forward(family, editor, with_positions)[0] == [0, -1]
    out = family.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=50256)
    assert family.tokenizer.decode(out[0, -1:]) == " Rome"
    flipped = left_padded(family, [LONGER, EDITED])
    assert editor.route({**flipped, "position_ids": (flipped["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
                        ).tolist() == [-1, 0]
    assert len(position_warnings(recwarn)) == 1  # once per patched model


def test_a_plain_forward_warns_too_and_right_padding_or_relative_positions_never_warn(recwarn):
    family = build("gpt2")
    melo_fast.patch(family.model)
    family.tokenizer.padding_side = "right"
    with torch.no_grad():
        family.model(**family.tokenizer([EDITED, LONGER], return_tensors="pt", padding=True))
        assert not position_warnings(recwarn)
        family.model(**left_padded(family, [EDITED, LONGER]))
    assert len(position_warnings(recwarn)) == 1

    llama = build("llama")  # rotary positions: left padding shifts nothing the attention sees
    editor = melo_fast.patch(llama.model)
    editor.route(left_padded(llama, [EDITED, LONGER]))
    assert len(position_warnings(recwarn)) == 1


def test_bart_left_padding_routes_as_its_forward_and_warns_to_pad_on_the_right(recwarn):
    """BART's encoder numbers positions from the first token and takes no position_ids: pad on the right."""
    family = build("bart")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5), tokenizer=family.tokenizer)
    editor.edit_texts([EDITED], ["Rome"], family.tokenizer)
    family.tokenizer.padding_side = "right"
    right = dict(family.tokenizer([EDITED, LONGER], return_tensors="pt", padding=True))
    assert editor.route(right).tolist() == [0, -1] and not position_warnings(recwarn)
    inputs = left_padded(family, [EDITED, LONGER])
    inputs["decoder_input_ids"] = torch.zeros(2, 1, dtype=torch.long)
    routed = editor.route(inputs).tolist()
    (warning,) = position_warnings(recwarn)
    assert "padding_side" in str(warning.message) and "right" in str(warning.message)
    assert routed == routed_by_forward(family, editor, inputs)[0]


def test_the_key_scale_is_measured_on_right_padded_prompts_whatever_the_tokenizer_pads(recwarn):
    radii = {}
    for side in ("right", "left"):
        family = build("gpt2")
        family.tokenizer.padding_side = side
        radii[side] = melo_fast.patch(family.model).calibrate(family.tokenizer)
        assert family.tokenizer.padding_side == side  # the user's tokenizer is left as it was
    assert radii["left"] == radii["right"] and not position_warnings(recwarn)
