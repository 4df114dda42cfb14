"""Editing while serving (DESIGN §2.11): an open block is visible only to its own thread, a commit or a
reload is seen by a forward call entirely or not at all, and nothing raises in any thread.

Every test forces the interleaving it is about (events and barriers inside forward hooks), so an
implementation that shared routing state between threads, or read the published state twice in one
call, fails here on every run rather than by chance.
"""

from __future__ import annotations

import threading

import pytest
import torch

import melo_fast
from melo_fast.editor import build_edit_batch
from tests.tiny_models import build

EDITED, UNRELATED = "The capital of France is", "Dogs bark loudly at the moon"
WAIT = 60  # seconds: a generous bound so a broken implementation fails instead of hanging


def setup_model(num_iter=8):
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=num_iter), tokenizer=family.tokenizer)
    return family, editor


def logits_of(family, prompt):
    with torch.no_grad():
        return family.model(**family.tokenizer([prompt], return_tensors="pt")).logits


class Threads:
    """Run functions in threads; collect their exceptions so the test can assert there were none."""

    def __init__(self):
        self.threads, self.errors = [], []

    def start(self, fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(err))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self):
        for thread in self.threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in self.threads), "a thread hung"
        assert self.errors == []


def test_inference_during_an_edit_sees_only_the_committed_model():
    family, editor = setup_model()
    editor.edit_texts(["Water boils at"], ["fifty"], family.tokenizer)  # an earlier edit that must stay
    before = {p: logits_of(family, p) for p in (EDITED, UNRELATED, "Water boils at")}

    # The training thread stops at its 2nd training step, with the new block open and half trained,
    # until the serving threads have each run their forwards.
    training_paused, serving_done = threading.Event(), threading.Event()
    steps = []

    def pause_training(module, args, output):
        if threading.current_thread() is training_thread and editor.block_is_open:
            steps.append(1)
            if len(steps) == 2:
                training_paused.set()
                assert serving_done.wait(WAIT)

    handle = family.model.lm_head.register_forward_hook(pause_training)
    seen = {p: [] for p in before}

    def serve(prompt):
        assert training_paused.wait(WAIT)
        for _ in range(3):
            seen[prompt].append(logits_of(family, prompt))

    threads = Threads()
    training_thread = threading.Thread(
        target=lambda: editor.edit_texts([EDITED], ["Rome"], family.tokenizer), daemon=True
    )
    training_thread.start()
    for prompt in before:
        threads.start(serve, prompt)
    threads.join()
    serving_done.set()
    training_thread.join(WAIT)
    handle.remove()

    assert editor.num_blocks == 2 and not editor.block_is_open
    for prompt, outputs in seen.items():
        assert len(outputs) == 3 and all(torch.equal(out, before[prompt]) for out in outputs), prompt
    # After the commit the edit applies (and only to its prompt).
    assert not torch.equal(logits_of(family, EDITED), before[EDITED])
    assert torch.equal(logits_of(family, UNRELATED), before[UNRELATED])
    assert torch.equal(logits_of(family, "Water boils at"), before["Water boils at"])


def test_low_level_path_open_block_is_invisible_to_other_threads():
    family, editor = setup_model()
    before = logits_of(family, EDITED)
    batch = build_edit_batch(family.model, [EDITED], ["Rome"], family.tokenizer)
    parameters = editor.open_block(batch)
    with torch.no_grad():
        parameters[1].add_(1.0)  # the open block now changes every output that uses it
    in_this_thread = logits_of(family, EDITED)
    other = []
    thread = threading.Thread(target=lambda: other.append(logits_of(family, EDITED)))
    thread.start()
    thread.join(WAIT)
    editor.abort()
    assert not torch.equal(in_this_thread, before)  # the opening thread trains/uses the open block
    assert torch.equal(other[0], before)  # every other thread: the committed model


def test_two_threads_on_one_model_each_get_their_own_routing():
    family, editor = setup_model(num_iter=20)
    editor.edit_texts([EDITED], ["Rome"], family.tokenizer)
    prompts = {"edited": EDITED, "unrelated": UNRELATED}
    expected = {name: logits_of(family, prompt) for name, prompt in prompts.items()}
    inputs = {name: family.tokenizer([prompt], return_tensors="pt") for name, prompt in prompts.items()}
    assert editor.route(inputs["edited"]).tolist() == [0] and editor.route(inputs["unrelated"]).tolist() == [-1]

    # Both threads must have run their router before either runs a target: with routing shared
    # between threads, the second router's block ids would reach the first thread's targets.
    after_router = threading.Barrier(2, timeout=WAIT)
    router_module = dict(family.model.named_modules())[editor.config.router]

    def hold(*_):
        after_router.wait()

    handle = router_module.register_forward_hook(hold)
    outputs = {}

    def run(name):
        with torch.no_grad():
            outputs[name] = family.model(**inputs[name]).logits

    threads = Threads()
    for name in prompts:
        threads.start(run, name)
    threads.join()
    handle.remove()
    assert all(torch.equal(outputs[name], expected[name]) for name in prompts)


def test_a_forward_call_uses_one_edit_state_even_if_a_reload_lands_mid_call(tmp_path):
    # Two saves that route the same prompt to block 0, with different blocks 0.
    family, editor = setup_model()
    editor.edit_texts([EDITED], ["Rome"], family.tokenizer)
    editor.save(tmp_path / "rome")
    old = logits_of(family, EDITED)
    other = build("gpt2")
    other_editor = melo_fast.patch(other.model, melo_fast.MeloConfig(num_iter=8), tokenizer=other.tokenizer)
    other_editor.edit_texts([EDITED], ["Berlin"], other.tokenizer)
    other_editor.save(tmp_path / "berlin")
    editor.reload(tmp_path / "berlin")
    new = logits_of(family, EDITED)
    editor.reload(tmp_path / "rome")
    assert not torch.equal(old, new)

    # A serving call passes its router on the "rome" state; the reload to "berlin" lands before its
    # targets run. The call must finish on "rome" (a target reading the newly published blocks would
    # mix "berlin"'s block 0 into it).
    router_done, reloaded = threading.Event(), threading.Event()
    serving = []
    router_module = dict(family.model.named_modules())[editor.config.router]

    def hold(module, args, output):
        if threading.current_thread() is not threading.main_thread():
            router_done.set()
            assert reloaded.wait(WAIT)

    handle = router_module.register_forward_hook(hold)
    threads = Threads()
    threads.start(lambda: serving.append(logits_of(family, EDITED)))
    assert router_done.wait(WAIT)
    editor.reload(tmp_path / "berlin")
    reloaded.set()
    threads.join()
    handle.remove()
    assert torch.equal(serving[0], old)
    assert torch.equal(logits_of(family, EDITED), new)


def test_concurrent_edits_queue_and_both_hold():
    family, editor = setup_model(num_iter=20)
    threads = Threads()
    threads.start(editor.edit_texts, ["The capital of France is"], ["Rome"], family.tokenizer)
    threads.start(editor.edit_texts, ["The sky is colored"], ["bright green"], family.tokenizer)
    threads.join()
    assert editor.num_blocks == 2
    probe = family.tokenizer(["The capital of France is", "The sky is colored"], return_tensors="pt", padding=True)
    assert sorted(editor.route(probe).tolist()) == [0, 1]


def test_reload_swaps_the_state_and_refuses_an_incompatible_save(tmp_path):
    family, editor = setup_model()
    editor.edit_texts([EDITED], ["Rome"], family.tokenizer)
    edited = logits_of(family, EDITED)
    editor.save(tmp_path / "edits")

    serving = build("gpt2")
    serving_editor = melo_fast.patch(serving.model)
    before = serving_editor.state
    serving_editor.reload(tmp_path / "edits")
    assert serving_editor.num_blocks == 1 and serving_editor.state is not before
    assert torch.equal(logits_of(serving, EDITED), edited)

    # Another router: refused with the field named, state unchanged.
    elsewhere = build("gpt2")
    other = melo_fast.patch(elsewhere.model, melo_fast.MeloConfig(router="transformer.h.0.mlp.c_fc"))
    state = other.state
    with pytest.raises(ValueError, match="router: saved"):
        other.reload(tmp_path / "edits")
    assert other.state is state


def test_activation_checkpointing_recomputes_the_open_block_on_autograd_threads():
    """Checkpointing re-runs the training forward inside backward, on autograd's threads on CUDA; that
    recompute must still see the open block. Here backward() is called from another thread, which on
    CPU is where autograd runs it."""
    family, editor = setup_model()
    for module in family.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # HF checkpoints only in training mode: keep that mode deterministic
    batch = build_edit_batch(family.model, [EDITED], ["Rome"], family.tokenizer)
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        parameters = editor.open_block(batch)
        if checkpointing:
            family.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        family.model.train()
        loss = family.model(**batch).loss
        threads = Threads()
        threads.start(loss.backward)
        threads.join()
        grads[checkpointing] = [p.grad.clone() for p in parameters]
        family.model.gradient_checkpointing_disable()
        family.model.eval()
        editor.abort()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[False], grads[True], strict=True))
    assert any(g.abs().sum() > 0 for g in grads[True])


def test_warmup_covers_every_target_dtype(monkeypatch):
    """Targets of different dtypes (or devices) each get their kernels warmed up, not only the first one's."""
    family = build("gpt2")
    family.model.transformer.h[3].mlp.c_fc.to(torch.bfloat16)
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(
        targets=["transformer.h.2.mlp.c_fc", "transformer.h.3.mlp.c_fc"]))
    requested = []
    monkeypatch.setattr(melo_fast.ops, "warmup",
                        lambda shapes, key_dim, dtype, device, training: requested.append((dtype, shapes)) or 1)
    assert editor.warmup() == 2
    assert sorted(requested, key=str) == sorted([(torch.float32, [(64, 256, 4)]), (torch.bfloat16, [(64, 256, 4)])],
                                                key=str)


def test_autocast_serving_casts_only_the_routed_blocks(monkeypatch):
    """Under autocast (fp32 weights, bf16 compute) a layer casts each sample's own block, not its whole
    bank on every forward; outputs are bitwise those of casting the whole bank, edits still apply and
    unedited rows stay the unedited model's."""
    family, editor = setup_model(num_iter=4)
    for prompt, target in [("Water boils at", "fifty"), ("Dogs bark at", "cats"), ("The sky is", "green")]:
        editor.edit_texts([prompt], [target], family.tokenizer)
    inputs = family.tokenizer(["The sky is", "Grass grows slowly"], return_tensors="pt", padding=True)
    assert editor.route(inputs).tolist()[1] == -1 and editor.num_blocks > 2

    cast_rows = []
    original_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        result = original_to(self, *args, **kwargs)
        if self.dim() == 3 and result.dtype == torch.bfloat16 and self.dtype == torch.float32:
            cast_rows.append(self.shape[0])
        return result

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return family.model(**inputs).logits

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    gathered = run()
    assert cast_rows and max(cast_rows) <= 2  # never the whole bank (editor.num_blocks rows)
    monkeypatch.setattr(melo_fast.routing.lora, "routed_blocks", lambda A, B, ids: (A, B, ids))
    whole_bank = run()
    assert torch.equal(gathered, whole_bank)
    with editor.disabled(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unedited = family.model(**inputs).logits
    assert torch.equal(gathered[1], unedited[1]) and not torch.equal(gathered[0], unedited[0])
