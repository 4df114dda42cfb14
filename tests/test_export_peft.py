"""Exported blocks served by a real consumer (PEFT's mixed-batch forward) give the patched model's outputs.

Plus the export's own promises: the scale reproduced by lora_alpha, PEFT's file layout, and the
folder rules of melo_fast.io.export (never destructive, the old or the new export always in place).
"""

import copy
import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from torch import nn

import melo_fast
from melo_fast.io import checkpoint, export
from tests.tiny_models import build

EDITS = (["The capital of France is"], ["Rome"]), (["Water boils at"], ["fifty degrees"])
PROMPTS = ["Water boils at", "Dogs bark loudly at the moon", "The capital of France is"]
ROUTED = ["block_0001", "__base__", "block_0000"]  # PROMPTS' rows: the second edit, none, the first


@pytest.fixture(scope="module", params=["gpt2", "llama", "t5"])
def served(request, tmp_path_factory):
    """(family, editor, PEFT model over the exported adapters on a fresh copy of the base model)."""
    torch.manual_seed(0)
    family = build(request.param)
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5), tokenizer=family.tokenizer)
    for prompts, targets in EDITS:
        editor.edit_texts(prompts, targets, family.tokenizer)
    # Frozen like the base model PEFT wraps: PyTorch's CPU lm_head GEMM in generate() differs by ~2e-7
    # between a weight that requires grad and one that does not, with or without any adapter.
    family.model.requires_grad_(False)
    path = tmp_path_factory.mktemp(request.param) / "export"
    assert editor.export_peft(path) == {0: "block_0000", 1: "block_0001"}
    consumer = peft.PeftModel.from_pretrained(build(request.param).model, str(path / "block_0000"),
                                              adapter_name="block_0000")
    consumer.load_adapter(str(path / "block_0001"), adapter_name="block_0001")
    assert sorted(consumer.base_model.targeted_module_names) == sorted(editor.config.targets)
    return family, editor, consumer.eval()


def test_peft_mixed_batch_forward_gives_the_patched_model_logits(served):
    family, editor, consumer = served
    family.tokenizer.padding_side = "right"
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    if family.kind == "seq2seq":
        inputs["decoder_input_ids"] = family.tokenizer(["Rome", "a dog", "fifty"], return_tensors="pt",
                                                       padding=True).input_ids
    names = editor.adapter_names(inputs)
    assert names == ROUTED
    with torch.no_grad():
        patched = family.model(**inputs).logits
        with editor.disabled():
            unedited = family.model(**inputs).logits
        served_logits = consumer(**inputs, adapter_names=names).logits
    assert (patched - unedited).abs().amax(dim=(1, 2))[[0, 2]].min() > 0.1  # the edits do change these rows
    torch.testing.assert_close(served_logits, patched, rtol=1e-5, atol=1e-5)
    assert torch.equal(served_logits[1], patched[1])  # the unedited row, bit for bit


def test_peft_and_the_patched_model_agree_on_left_padded_batches_without_position_ids(served):
    """adapter_names() reads the keys from the inputs as given, as the patched model's own forward does: on
    GPT-2 (absolute positions) the left-padded rows sit at shifted positions in both."""
    family, editor, consumer = served
    family.tokenizer.padding_side = "left"
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    if family.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.zeros(len(PROMPTS), 1, dtype=torch.long)
    names = editor.adapter_names(inputs)
    with torch.no_grad():
        patched = family.model(**inputs).logits
        served_logits = consumer(**inputs, adapter_names=names).logits
    torch.testing.assert_close(served_logits, patched, rtol=1e-5, atol=1e-5)


def test_peft_mixed_batch_generation_gives_the_patched_model_generation(served):
    family, editor, consumer = served
    family.tokenizer.padding_side = "left"  # the batch generate() needs for decoder-only models
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    # generate() gives a decoder-only model the positions of the attention mask: route with the same ones.
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    names = editor.adapter_names(inputs if family.kind == "seq2seq" else {**inputs, "position_ids": positions})
    assert names == ROUTED
    settings = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                    pad_token_id=family.tokenizer.pad_token_id)
    patched = family.model.generate(**inputs, **settings)
    served_output = consumer.generate(**inputs, adapter_names=names, **settings)
    assert torch.equal(served_output.sequences, patched.sequences)
    patched_scores, served_scores = torch.stack(patched.scores, 1), torch.stack(served_output.scores, 1)
    torch.testing.assert_close(served_scores, patched_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(served_scores[1], patched_scores[1])


def test_lora_alpha_gives_the_scale_exactly_or_to_one_ulp():
    for scale in (1.0, 20.0, 100.0, 350.0, 7.0):  # integer scales (MELO's block counts): exact at any rank
        assert all(export.lora_alpha(scale, rank) / rank == scale for rank in range(1, 257))
    for scale in (0.1, 1 / 3, 2.2, 7837.985911967868):  # any scale at a power-of-two rank: exact
        assert all(export.lora_alpha(scale, 2**p) / 2**p == scale for p in range(9))
    generator = np.random.default_rng(0)
    for scale, rank in zip(generator.uniform(1e-3, 1e3, 2000), generator.integers(1, 257, 2000), strict=True):
        scale, rank = float(scale), int(rank)
        quotient = export.lora_alpha(scale, rank) / rank
        assert abs(quotient - scale) <= math.ulp(scale) and np.float32(quotient) == np.float32(scale)


# --- the files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_editor():
    """A gpt2 editor with two blocks (cheap edits: only the files matter here)."""
    torch.manual_seed(0)
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=2), tokenizer=family.tokenizer)
    for prompts, targets in EDITS:
        editor.edit_texts(prompts, targets, family.tokenizer)
    return family, editor


def test_adapter_files_are_those_peft_writes_and_routing_loads(gpt2_editor, tmp_path):
    family, editor = gpt2_editor
    assert editor.export_peft(tmp_path / "export", blocks=[1]) == {1: "block_0001"}
    path = tmp_path / "export"
    assert export.exported_adapters(path) == {1: "block_0001"}
    assert sorted(p.name for p in path.iterdir()) == ["block_0001", export.MANIFEST, export.ROUTING]
    config = json.loads((path / "block_0001" / export.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 80.0, True)  # Conv1D
    assert config["target_modules"] == list(editor.config.targets)

    # PEFT's own save of a LoRA with this config: the same tensor names, shapes and dtypes.
    reference = peft.get_peft_model(build("gpt2").model, peft.LoraConfig(**{
        k: config[k] for k in ("r", "lora_alpha", "target_modules", "fan_in_fan_out", "task_type")}))
    reference.save_pretrained(tmp_path / "peft")

    def layout(file):
        with safe_open(file, "pt") as f:
            return f.metadata(), {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}

    assert layout(path / "block_0001" / export.ADAPTER_WEIGHTS) == layout(tmp_path / "peft" / export.ADAPTER_WEIGHTS)
    A, B = editor.blocks()[editor.config.targets[0]]
    with safe_open(path / "block_0001" / export.ADAPTER_WEIGHTS, "pt") as f:
        prefix = f"base_model.model.{editor.config.targets[0]}"
        assert torch.equal(f.get_tensor(f"{prefix}.lora_A.weight"), A[1])
        assert torch.equal(f.get_tensor(f"{prefix}.lora_B.weight"), B[1].T)

    fresh = build("gpt2")
    router = melo_fast.load(fresh.model, path / export.ROUTING)
    inputs = family.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert router.adapter_names(inputs) == editor.adapter_names(inputs) == ROUTED
    if current_umask() == 0o022:  # modes are checked under the usual umask only
        modes = {stat.S_IMODE(p.stat().st_mode) for p in path.rglob("*") if p.is_file()}
        folders = {stat.S_IMODE(p.stat().st_mode) for p in [path, *path.rglob("*")] if p.is_dir()}
        assert (modes, folders) == ({0o644}, {0o755})


def test_a_target_peft_cannot_name_alone_and_a_peft_model_are_refused(gpt2_editor, tmp_path):
    family = build("gpt2")
    # A module whose name ends with a target's full name: PEFT's suffix rule would give it an adapter too.
    family.model.shadow = nn.ModuleDict({"transformer": copy.deepcopy(family.model.transformer)})
    config = melo_fast.MeloConfig(router="transformer.h.1.mlp.c_fc", targets=["transformer.h.2.mlp.c_fc"])
    editor = melo_fast.patch(family.model, config)
    shadow = "shadow.transformer.h.2.mlp.c_fc"
    assert check_target_module_exists(peft.LoraConfig(target_modules=editor.config.targets), shadow)
    with pytest.raises(ValueError, match=f"would also select \\['{shadow}'\\]"):
        editor.export_peft(tmp_path / "export")
    assert not (tmp_path / "export").exists()

    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    wrapped = peft.get_peft_model(build("gpt2").model, lora)
    with pytest.raises(ValueError, match="patched a PEFT model"):
        melo_fast.patch(wrapped).export_peft(tmp_path / "export")


def current_umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


# --- never destructive, the old or the new export always in place ------------------------------
def listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))


def exported_blocks(path) -> list[int]:
    """The export at ``path``, read completely: manifest, every adapter, the routing save."""
    adapters = export.exported_adapters(path)
    for name in adapters.values():
        with safe_open(path / name / export.ADAPTER_WEIGHTS, "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
        json.loads((path / name / export.ADAPTER_CONFIG).read_text())
    assert checkpoint.read(path / export.ROUTING).num_blocks == 2
    return sorted(adapters)


def hidden(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_refuses_a_file_a_foreign_folder_and_foreign_files_in_an_export(gpt2_editor, tmp_path):
    _, editor = gpt2_editor
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        editor.export_peft(notes)
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print()")
    with pytest.raises(FileExistsError, match=r"not empty \(train.py\) and is not a melo_fast PEFT export"):
        editor.export_peft(project)
    path = tmp_path / "export"
    editor.export_peft(path, blocks=[0])
    (path / "block_0000" / "notes.md").write_text("mine")
    before = listing(path)
    with pytest.raises(FileExistsError, match=r"also holds files it did not write \(block_0000/notes.md\)"):
        editor.export_peft(path)
    (path / "block_0000" / "notes.md").unlink()
    (path / export.MANIFEST).write_text("{not json")
    with pytest.raises(FileExistsError, match="cannot tell its own files"):
        editor.export_peft(path)
    assert notes.read_text() == "mine" and listing(project) == [("train.py", b"print()")]
    assert [name for name, _ in listing(path)] == [name for name, _ in before if name != "block_0000/notes.md"]
    assert hidden(tmp_path) == []



@pytest.mark.parametrize("entry", ["../victim.txt", "absolute", "adapter"])
def test_a_manifest_naming_a_file_outside_the_export_is_refused_and_the_file_kept(gpt2_editor, tmp_path, entry):
    """The manifest comes from inside the folder: replacing the export must not delete what it names outside."""
    _, editor = gpt2_editor
    path = tmp_path / "export"
    editor.export_peft(path, blocks=[0])
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    manifest = json.loads((path / export.MANIFEST).read_text())
    if entry == "adapter":
        listed = manifest["adapters"]["0"] = "../victim.txt"
    else:
        listed = str(victim) if entry == "absolute" else entry
        manifest["files"].append(listed)
    (path / export.MANIFEST).write_text(json.dumps(manifest))
    before = listing(path)
    unsafe = re.escape(f"it lists {listed!r}, which is not a file or adapter melo_fast writes")
    with pytest.raises(FileExistsError, match=unsafe):
        editor.export_peft(path)
    with pytest.raises(ValueError, match=unsafe):
        export.exported_adapters(path)
    assert victim.read_text() == "mine" and listing(path) == before and hidden(tmp_path) == []

def test_replacing_an_export_leaves_only_the_new_one(gpt2_editor, tmp_path, monkeypatch):
    _, editor = gpt2_editor
    path = tmp_path / "export"
    editor.export_peft(path, blocks=[0])
    editor.export_peft(path, blocks=[1])
    assert exported_blocks(path) == [1] and not (path / "block_0000").exists() and hidden(tmp_path) == []
    monkeypatch.chdir(path)  # into the folder being replaced: the process ends up in the new export
    editor.export_peft(".")
    assert exported_blocks(Path(".")) == [0, 1] and os.path.samefile(os.getcwd(), path)


def test_a_file_added_to_the_old_export_during_the_export_is_kept(gpt2_editor, tmp_path, monkeypatch):
    _, editor = gpt2_editor
    path = tmp_path / "export"
    editor.export_peft(path, blocks=[0])
    write = export._write_export

    def write_while_someone_adds_a_file(*args):
        (path / "block_0000" / "notes.md").write_text("mine")  # after the check for foreign files
        return write(*args)

    monkeypatch.setattr(export, "_write_export", write_while_someone_adds_a_file)
    with pytest.warns(UserWarning, match="could not be removed completely"):
        editor.export_peft(path)
    assert exported_blocks(path) == [0, 1]
    [aside] = hidden(tmp_path)
    assert listing(tmp_path / aside) == [("block_0000", b""), ("block_0000/notes.md", b"mine")]



def test_a_subfolder_swapped_for_a_link_during_the_export_is_not_followed(gpt2_editor, tmp_path, monkeypatch):
    _, editor = gpt2_editor
    path = tmp_path / "export"
    editor.export_peft(path, blocks=[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in (export.ADAPTER_CONFIG, export.ADAPTER_WEIGHTS):
        (elsewhere / name).write_text("mine")
    write = export._write_export

    def write_while_someone_swaps_a_folder_for_a_link(*args):
        for file in (path / "block_0000").iterdir():  # after the check for foreign files
            file.unlink()
        (path / "block_0000").rmdir()
        (path / "block_0000").symlink_to(elsewhere, target_is_directory=True)
        return write(*args)

    monkeypatch.setattr(export, "_write_export", write_while_someone_swaps_a_folder_for_a_link)
    with pytest.warns(UserWarning, match="could not be removed completely"):
        editor.export_peft(path)
    assert exported_blocks(path) == [0, 1]
    assert listing(elsewhere) == [(export.ADAPTER_CONFIG, b"mine"), (export.ADAPTER_WEIGHTS, b"mine")]

def _fail(*args, **kwargs):
    raise OSError("injected failure")


def _fail_on_call(function, call):
    """``function``, except that call number ``call`` raises."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(None)
        return _fail() if len(calls) == call else function(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("step", ["adapter file", "routing save", "exchange", "fallback first rename",
                                  "fallback second rename", "fallback put back", "removing the old one"])
def test_a_failure_at_any_step_leaves_the_old_or_the_new_export(gpt2_editor, tmp_path, monkeypatch, step):
    _, editor = gpt2_editor
    path = tmp_path / "export"
    editor.export_peft(path, blocks=[0])
    if step == "adapter file":
        monkeypatch.setattr(export, "_write_file", _fail_on_call(export._write_file, 3))
    elif step == "routing save":
        monkeypatch.setattr(checkpoint, "write", _fail)
    elif step == "exchange":
        monkeypatch.setattr(export, "_exchange", _fail)
    elif step.startswith("fallback"):  # a system without renameat2: two renames
        monkeypatch.setattr(export, "_exchange", lambda a, b: False)
        failing = {"fallback first rename": [1], "fallback second rename": [2], "fallback put back": [2, 3]}[step]
        calls, rename = [], os.rename

        def flaky_rename(source, destination):
            calls.append(None)
            return _fail() if len(calls) in failing else rename(source, destination)

        monkeypatch.setattr(export.os, "rename", flaky_rename)
    else:
        monkeypatch.setattr(export.Path, "rmdir", _fail)

    if step == "removing the old one":
        with pytest.warns(UserWarning, match="could not be removed completely"):
            editor.export_peft(path)
        assert exported_blocks(path) == [0, 1]  # the new one is in place; the old one's leftovers are kept aside
        assert len(hidden(tmp_path)) == 1
        return
    with pytest.raises(OSError, match="injected failure"):
        editor.export_peft(path)
    if step == "fallback put back":
        # Putting the old export back failed too: the path is empty, both complete exports are kept beside it.
        assert not path.exists()
        kept = sorted(tmp_path / name for name in hidden(tmp_path))
        assert sorted(exported_blocks(p) for p in kept) == [[0], [0, 1]]
        return
    assert exported_blocks(path) == [0] and hidden(tmp_path) == []


def test_export_reads_one_state_even_when_a_commit_lands_meanwhile(gpt2_editor, tmp_path, monkeypatch):
    family, editor = gpt2_editor
    saved = tmp_path / "saved"
    editor.save(saved)
    state_before, blocks = editor.state, editor.blocks

    def commit_then_read(**kwargs):  # a commit from elsewhere lands between export's read of the state and the blocks
        if editor.state is state_before:
            editor.edit_texts(["Grass is"], ["blue"], family.tokenizer)
        return blocks(**kwargs)

    monkeypatch.setattr(editor, "blocks", commit_then_read)
    try:
        editor.export_peft(tmp_path / "export")
        routing = checkpoint.read(tmp_path / "export" / export.ROUTING)
        assert sorted(export.exported_adapters(tmp_path / "export")) == [0, 1, 2]
        assert routing.num_blocks == 3 and int(routing.database.point_blocks.max()) == 2
    finally:
        monkeypatch.undo()
        editor.reload(saved)  # the module's editor goes back to its two blocks
