"""Bad input gets a clear error, and a failed edit or load loses nothing."""

import json
import threading

import pytest
import torch
from torch import nn

import melo_fast
from melo_fast.editor import build_edit_batch
from tests.tiny_models import block_tensors, build

PROMPTS, TARGETS = ["The capital of France is", "The sky is"], ["Rome", "green"]


@pytest.fixture
def gpt2():
    family = build("gpt2")
    return family, melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5), tokenizer=family.tokenizer)


def snapshot(editor):
    tensors, meta = editor.db.state_dict()
    return {k: v.clone() for k, v in tensors.items()}, meta, block_tensors(editor), editor.num_blocks


def assert_same_state(editor, saved):
    tensors, meta, banks, num_blocks = saved
    now_tensors, now_meta, now_banks, _ = snapshot(editor)
    assert editor.num_blocks == num_blocks and now_meta == meta
    assert all(torch.equal(tensors[k], now_tensors[k]) for k in tensors)
    for name in banks:
        assert all(torch.equal(a, b) for a, b in zip(banks[name], now_banks[name], strict=True))
    assert not editor.block_is_open and not editor.routing.training
    assert all(p.requires_grad for p in editor.model.parameters())


def test_missing_labels_and_empty_batch(gpt2):
    family, editor = gpt2
    batch = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    with pytest.raises(ValueError, match="no 'labels'"):
        editor.edit({k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="empty"):
        editor.edit({k: v[:0] for k, v in batch.items()})
    with pytest.raises(ValueError, match="no target tokens"):
        editor.edit({**batch, "labels": torch.full_like(batch["labels"], -100)})
    with pytest.raises(ValueError, match="no prompts"):
        editor.edit_texts([], [], family.tokenizer)
    assert editor.num_blocks == 0 and len(editor.db) == 0


def test_batch_on_another_device(gpt2):
    family, editor = gpt2
    batch = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        editor.edit({**batch, "attention_mask": batch["attention_mask"].to("meta")})


def test_padding_without_attention_mask_warns(gpt2):
    family, _ = gpt2
    family.model.config.pad_token_id = family.tokenizer.pad_token_id
    inputs = family.tokenizer(["a b c d e", "a"], return_tensors="pt", padding=True)
    with pytest.warns(UserWarning, match="no attention_mask"):
        family.model(input_ids=inputs.input_ids)


def test_bad_module_names():
    family = build("gpt2")
    with pytest.raises(ValueError, match="does not exist.*candidate.*transformer.h.0.attn.c_attn"):
        melo_fast.patch(family.model, melo_fast.MeloConfig(router="transformer.h.9.mlp.c_fc"))
    with pytest.raises(TypeError, match="GPT2MLP, not nn.Linear or Conv1D"):
        melo_fast.patch(family.model, melo_fast.MeloConfig(targets=["transformer.h.3.mlp"]))
    with pytest.raises(ValueError, match="ambiguous"):
        melo_fast.patch(family.model, melo_fast.MeloConfig(router="mlp.c_fc"))
    # Failed patches leave nothing behind, so a correct patch still works.
    melo_fast.patch(family.model)
    with pytest.raises(RuntimeError, match="already patched"):
        melo_fast.patch(family.model)


def test_unknown_architecture_lists_candidates():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="no default router.*candidate.*0, 2"):
        melo_fast.patch(model)


def test_target_before_router_is_an_error_at_first_forward():
    family = build("gpt2")
    config = melo_fast.MeloConfig(router="transformer.h.3.mlp.c_fc", targets=["transformer.h.1.mlp.c_fc"])
    melo_fast.patch(family.model, config)
    inputs = family.tokenizer(["hello world"], return_tensors="pt")
    with pytest.raises(RuntimeError, match="ran before the router"):
        family.model(**inputs)


class _FailAt:
    """Forward hook that breaks the model's output at the n-th call."""

    def __init__(self, n, error=None):
        self.n, self.calls, self.error = n, 0, error

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls >= self.n:
            if self.error is not None:
                raise self.error
            return output * float("nan")
        return None


@pytest.mark.parametrize("failure", ["nan_loss", "keyboard_interrupt"])
def test_failed_edit_leaves_everything_as_before(gpt2, failure):
    family, editor = gpt2
    editor.edit_texts(PROMPTS, TARGETS, family.tokenizer)
    probe = family.tokenizer(PROMPTS + ["Dogs bark"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = family.model(**probe).logits
    saved = snapshot(editor)
    hook = _FailAt(3, KeyboardInterrupt() if failure == "keyboard_interrupt" else None)
    handle = family.model.lm_head.register_forward_hook(hook)
    expected_error = KeyboardInterrupt if failure == "keyboard_interrupt" else FloatingPointError
    with pytest.raises(expected_error):
        editor.edit_texts(["Water boils at"], ["fifty"], family.tokenizer)
    handle.remove()
    assert_same_state(editor, saved)
    with torch.no_grad():
        assert torch.equal(family.model(**probe).logits, expected)


def test_corrupt_or_incompatible_save_folders(gpt2, tmp_path):
    family, editor = gpt2
    editor.edit_texts(PROMPTS, TARGETS, family.tokenizer)
    editor.save(tmp_path / "edits")
    with pytest.raises(FileNotFoundError, match="no save folder"):
        melo_fast.load(build("gpt2").model, tmp_path / "nowhere")

    meta_file = tmp_path / "edits" / "melo_config.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        melo_fast.load(build("gpt2").model, tmp_path / "edits")
    meta_file.write_text("{ not json")
    with pytest.raises(ValueError, match="corrupt"):
        melo_fast.load(build("gpt2").model, tmp_path / "edits")
    meta_file.write_text(json.dumps(meta))

    # Same module names, other shapes: refused, and the model is left unpatched.
    other = build("gpt2").model
    wider = type(other)(other.config.__class__(**{**other.config.to_dict(), "n_inner": 128})).eval()
    with pytest.raises(ValueError, match="another model"):
        melo_fast.load(wider, tmp_path / "edits")
    assert getattr(wider, "_melo_editor", None) is None
    melo_fast.load(build("gpt2").model, tmp_path / "edits")  # the folder itself is fine


def test_save_replaces_an_existing_folder_atomically(gpt2, tmp_path):
    family, editor = gpt2
    editor.save(tmp_path / "edits")
    editor.edit_texts(PROMPTS, TARGETS, family.tokenizer)
    editor.save(tmp_path / "edits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits"]  # no temp folders left
    assert melo_fast.load(build("gpt2").model, tmp_path / "edits").num_blocks == 1


def test_save_while_a_block_is_open_holds_the_committed_edits(gpt2, tmp_path):
    family, editor = gpt2
    editor.edit_texts(PROMPTS[:1], TARGETS[:1], family.tokenizer)
    committed = block_tensors(editor)
    parameters = editor.open_block(build_edit_batch(family.model, PROMPTS[1:], TARGETS[1:], family.tokenizer))
    with torch.no_grad():
        parameters[1].add_(1.0)  # the open block differs from anything committed
    editor.save(tmp_path / "edits")
    assert editor.export_peft(tmp_path / "export") == {0: "block_0000"}  # the committed block only
    editor.abort()
    loaded = melo_fast.load(build("gpt2").model, tmp_path / "edits")
    assert loaded.num_blocks == 1 and len(loaded.db) == 1
    for name, tensors in block_tensors(loaded).items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, committed[name], strict=True))


def _in_other_thread(action):
    """Run ``action`` in a new thread; return what it raised (or None)."""
    raised = []

    def run():
        try:
            action()
        except Exception as err:  # noqa: BLE001 - the test inspects it
            raised.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0] if raised else None


def test_only_the_opening_thread_may_commit_abort_or_unpatch(gpt2):
    family, editor = gpt2
    editor.open_block(build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer))
    for action in (editor.commit, editor.abort, lambda: melo_fast.unpatch(family.model)):
        err = _in_other_thread(action)
        assert isinstance(err, RuntimeError) and "another thread" in str(err)
        assert editor.block_is_open and editor.routing.training and family.model._melo_editor is editor
    assert editor.commit()[0] == 0 and editor.num_blocks == 1


def test_open_block_failing_half_way_leaves_nothing_open(gpt2, monkeypatch):
    family, editor = gpt2
    saved = snapshot(editor)
    last = list(editor.lora_layers.values())[-1]
    monkeypatch.setattr(last, "open_block", lambda earlier: (_ for _ in ()).throw(MemoryError("no room")))
    with pytest.raises(MemoryError):
        editor.open_block(build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer))
    assert_same_state(editor, saved)
    assert all(layer.active_A is None and layer.active_B is None for layer in editor.lora_layers.values())
    monkeypatch.undo()
    assert editor.edit_texts(PROMPTS, TARGETS, family.tokenizer).block_id == 0


def test_commit_failing_half_way_keeps_every_bank_at_the_published_count(gpt2, monkeypatch):
    family, editor = gpt2
    editor.edit_texts(PROMPTS[:1], TARGETS[:1], family.tokenizer)
    saved = snapshot(editor)
    editor.open_block(build_edit_batch(family.model, PROMPTS[1:], TARGETS[1:], family.tokenizer))
    last = list(editor.lora_layers.values())[-1]
    monkeypatch.setattr(last.bank, "chunks", lambda: (_ for _ in ()).throw(MemoryError("no room")))
    with pytest.raises(MemoryError):
        editor.commit()
    monkeypatch.undo()
    assert all(layer.bank.count == 1 for layer in editor.lora_layers.values())
    editor.abort()
    assert_same_state(editor, saved)
    result = editor.edit_texts(PROMPTS[1:], TARGETS[1:], family.tokenizer)
    assert result.block_id == 1 and all(layer.bank.count == 2 for layer in editor.lora_layers.values())


def test_quantized_target_weights_are_refused():
    family = build("gpt2")
    target = family.model.transformer.h[3].mlp.c_fc
    target.weight = nn.Parameter(target.weight.data.to(torch.int8), requires_grad=False)  # as bitsandbytes int8
    with pytest.raises(TypeError, match=r"transformer\.h\.3\.mlp\.c_fc.*int8.*llm_int8_skip_modules"):
        melo_fast.patch(family.model, melo_fast.MeloConfig(targets=["transformer.h.3.mlp.c_fc"]))
    assert getattr(family.model, "_melo_editor", None) is None


def test_edit_texts_needs_lists_and_non_empty_texts(gpt2):
    family, editor = gpt2
    state = editor.state
    with pytest.raises(TypeError, match="prompts must be a list"):
        editor.edit_texts("abc", "xyz", family.tokenizer)
    with pytest.raises(TypeError, match="targets must be a list"):
        editor.edit_texts(["abc"], "xyz", family.tokenizer)
    with pytest.raises(ValueError, match="target 1 is ''"):
        editor.edit_texts(["The sky is", "Grass is"], ["blue", ""], family.tokenizer)
    with pytest.raises(ValueError, match="prompt 0 is '   '"):
        editor.edit_texts(["   "], ["blue"], family.tokenizer)
    with pytest.raises(ValueError, match="prompt 1 is ''"):
        editor.edit_texts(["The sky is", ""], ["blue", "red"], family.tokenizer)
    assert editor.state is state


def test_seq2seq_and_classifier_labels_are_checked_before_any_work():
    t5 = build("t5")
    editor = melo_fast.patch(t5.model, melo_fast.MeloConfig(num_iter=2), tokenizer=t5.tokenizer)
    batch = build_edit_batch(t5.model, ["The sky is"], ["blue"], t5.tokenizer)
    with pytest.raises(ValueError, match=r"rows \[0\] have no target tokens"):
        editor.edit({**batch, "labels": torch.full_like(batch["labels"], -100)})
    with pytest.raises(ValueError, match=r"seq2seq labels must be \[N, T_target\]"):
        editor.edit({**batch, "labels": batch["labels"][:, 0]})

    bert = build("bert")
    editor = melo_fast.patch(bert.model, melo_fast.MeloConfig(num_iter=2), tokenizer=bert.tokenizer)
    batch = build_edit_batch(bert.model, ["The sky is"], [1], bert.tokenizer)
    with pytest.raises(ValueError, match=r"rows \[0\] have no class id"):
        editor.edit({**batch, "labels": torch.tensor([-100])})
    with pytest.raises(ValueError, match=r"classifier labels must be \[N\]"):
        editor.edit({**batch, "labels": torch.zeros(1, 2, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="'POSITIVE' is not a label of this model; valid labels:.*LABEL_0"):
        editor.edit_texts(["The sky is"], ["POSITIVE"], bert.tokenizer)
    with pytest.raises(ValueError, match="class 9, but the model has classes 0..5"):
        editor.edit_texts(["The sky is"], [9], bert.tokenizer)
    assert editor.num_blocks == 0


def test_route_and_keys_need_the_input_dict(gpt2):
    family, editor = gpt2
    ids = family.tokenizer(["hello"], return_tensors="pt").input_ids
    for call in (editor.route, editor.keys):
        with pytest.raises(TypeError, match="take the dict the model takes") as error:
            call(ids)
        assert len(str(error.value)) < 200


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_edit_works_from_a_serving_loop_without_gradients(gpt2, mode):
    family, editor = gpt2
    editor.config = editor.config.replace(num_iter=20)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        batch = build_edit_batch(family.model, ["The capital of France is"], ["Rome"], family.tokenizer)
        editor.edit(batch)
        inputs = family.tokenizer(["The capital of France is"], return_tensors="pt")
        out = family.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=50256)
    assert family.tokenizer.decode(out[0, -1:]) == " Rome"


@pytest.mark.parametrize("name", ["gpt2", "t5", "bert"])
def test_max_length_truncates_prompts_never_targets(name):
    family = build(name)
    prompt, target = "one two three four five six seven eight nine ten", "eleven"
    targets = [1] if name == "bert" else [target]
    full = build_edit_batch(family.model, [prompt], targets, family.tokenizer)
    cut = build_edit_batch(family.model, [prompt], targets, family.tokenizer, max_length=4)
    prompt_tokens = (full["labels"] == -100).sum() if name == "gpt2" else full["input_ids"].shape[1]
    assert prompt_tokens > 4
    if name == "gpt2":  # the prompt part is where the labels are -100
        assert (cut["labels"] == -100).sum() == 4
    else:
        assert cut["input_ids"].shape[1] == 4
    assert torch.equal(cut["labels"][cut["labels"] != -100], full["labels"][full["labels"] != -100])


@pytest.mark.parametrize("name, target, what", [
    ("gpt2", None, "NoneType"), ("gpt2", 42, "int"), ("gpt2", ["a", "b"], "list"),
    ("t5", None, "NoneType"), ("t5", 3.5, "float"),
    ("bert", None, "NoneType"), ("bert", True, "bool"), ("bert", 1.0, "float"),
])
def test_a_target_that_is_not_text_is_refused_naming_the_row(name, target, what, monkeypatch):
    """str(None) would train the answer " None": refused before any tokenization."""
    family = build(name)
    calls = []
    monkeypatch.setattr(type(family.tokenizer), "__call__", lambda *a, **k: calls.append(a))
    with pytest.raises(TypeError, match=rf"target 1 has type {what}\b"):
        build_edit_batch(family.model, ["The sky is", "Grass is"], [1 if name == "bert" else "blue", target],
                         family.tokenizer)
    assert calls == []  # nothing was tokenized


def test_classifier_targets_may_be_label_names_or_class_ids():
    import numpy as np

    family = build("bert")
    family.model.config.label2id = {f"LABEL_{i}": i for i in range(6)}
    batch = build_edit_batch(family.model, ["a", "b", "c"], ["LABEL_2", 3, np.int64(4)], family.tokenizer)
    assert batch["labels"].tolist() == [2, 3, 4]


def test_token_ids_that_are_not_integers_are_refused_naming_the_dtype(gpt2):
    family, editor = gpt2
    batch = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    with pytest.raises(ValueError, match=r"input_ids.*torch.float32.*token ids"):
        editor.edit({**batch, "input_ids": batch["input_ids"].float()})
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for call in (editor.route, editor.keys, editor.adapter_names):
        with pytest.raises(ValueError, match=r"input_ids.*torch.float64.*token ids"):
            call({**inputs, "input_ids": inputs["input_ids"].double()})
    assert editor.num_blocks == 0


def test_an_editor_detached_by_unpatch_says_so_and_still_saves_its_edits(gpt2, tmp_path):
    family, editor = gpt2
    editor.edit_texts(PROMPTS[:1], TARGETS[:1], family.tokenizer)
    editor.save(tmp_path / "before")
    melo_fast.unpatch(family.model)
    batch = build_edit_batch(family.model, PROMPTS, TARGETS, family.tokenizer)
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    calls = {
        "edit": lambda: editor.edit(batch),
        "edit_texts": lambda: editor.edit_texts(PROMPTS, TARGETS, family.tokenizer),
        "open_block": lambda: editor.open_block(batch),
        "commit": editor.commit,
        "abort": editor.abort,
        "route": lambda: editor.route(inputs),
        "keys": lambda: editor.keys(inputs),
        "adapter_names": lambda: editor.adapter_names(inputs),
        "calibrate": lambda: editor.calibrate(family.tokenizer),
        "warmup": editor.warmup,
        "reload": lambda: editor.reload(tmp_path / "before"),
        "replace_state": lambda: editor.replace_state(editor.db, editor.blocks()),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"detached from its model by unpatch\(\).*melo_fast.load") as error:
            call()
        assert "did not run" not in str(error.value), name
    editor.save(tmp_path / "after")  # its committed edits stay savable and exportable
    assert editor.export_peft(tmp_path / "export") == {0: "block_0000"}
    assert melo_fast.load(family.model, tmp_path / "after").num_blocks == 1


def test_copying_or_pickling_a_patched_model_says_how_to_copy_it(gpt2, tmp_path):
    import copy
    import pickle

    family, editor = gpt2
    editor.edit_texts(PROMPTS[:1], TARGETS[:1], family.tokenizer)
    how = r"cannot be copied or pickled.*editor.save\(path\).*melo_fast.unpatch\(model\).*melo_fast.load"
    for attempt in (lambda: copy.deepcopy(family.model), lambda: pickle.dumps(family.model),
                    lambda: copy.deepcopy(editor), lambda: pickle.dumps(editor),
                    lambda: pickle.dumps(family.model.generate)):
        with pytest.raises(TypeError, match=how):
            attempt()
    assert set(family.model.state_dict()) == set(build("gpt2").model.state_dict())  # state_dict is unchanged

    # The recipe the message gives: two independent patched models with the same edits.
    editor.save(tmp_path / "edits")
    melo_fast.unpatch(family.model)
    twin = copy.deepcopy(family.model)
    original, copied = melo_fast.load(family.model, tmp_path / "edits"), melo_fast.load(twin, tmp_path / "edits")
    copied.edit_texts(["Water boils at"], ["fifty"], family.tokenizer)
    assert (original.num_blocks, copied.num_blocks) == (1, 2)
    inputs = family.tokenizer(PROMPTS[:1], return_tensors="pt")
    assert original.route(inputs).tolist() == copied.route(inputs).tolist() == [0]
