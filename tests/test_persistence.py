"""Saving and loading never destroy data (melo_fast.io.checkpoint's guarantees), and bad saves fail clearly."""

import json
import os
import re
import stat

import pytest
import torch

import melo_fast
from melo_fast.io import checkpoint
from tests.tiny_models import build

PROMPT = "The capital of France is"


@pytest.fixture
def edited():
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5), tokenizer=family.tokenizer)
    editor.edit_texts([PROMPT], ["Rome"], family.tokenizer)
    return family, editor


def logits(family):
    with torch.no_grad():
        return family.model(**family.tokenizer([PROMPT], return_tensors="pt")).logits


def loaded_blocks(path) -> int:
    return melo_fast.load(build("gpt2").model, path).num_blocks


def listing(folder):
    return sorted((p.name, p.read_bytes()) for p in folder.iterdir())


def test_save_refuses_a_file_and_a_foreign_folder_and_leaves_them_untouched(edited, tmp_path):
    _, editor = edited
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    with pytest.raises(FileExistsError, match="is a file"):
        editor.save(target)
    assert target.read_text() == "my notes"

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text("print('hi')")
    before = listing(folder)
    with pytest.raises(FileExistsError, match=r"not empty \(train.py\) and is not a melo_fast save"):
        editor.save(folder)
    assert listing(folder) == before


def test_replacing_an_earlier_save_keeps_other_files_and_removes_the_old_weights(edited, tmp_path):
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    (path / "README.md").write_text("edits of 2 Dec")
    first_weights = json.loads((path / checkpoint.CONFIG_FILE).read_text())["weights_file"]
    editor.edit_texts(["Water boils at"], ["fifty"], family.tokenizer)
    editor.save(path)
    names = sorted(p.name for p in path.iterdir())
    second_weights = json.loads((path / checkpoint.CONFIG_FILE).read_text())["weights_file"]
    assert names == sorted(["README.md", checkpoint.CONFIG_FILE, second_weights]) and first_weights not in names
    assert loaded_blocks(path) == 2


def test_save_to_the_current_folder(edited, tmp_path, monkeypatch):
    _, editor = edited
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    editor.save(".")
    assert loaded_blocks(empty) == 1
    assert not [p for p in empty.iterdir() if p.name.startswith(".")]  # no temporary files left
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "data.csv").write_text("1,2")
    monkeypatch.chdir(busy)
    with pytest.raises(FileExistsError):
        editor.save(".")
    assert [p.name for p in busy.iterdir()] == ["data.csv"]


def test_saved_files_get_the_usual_permissions(edited, tmp_path):
    _, editor = edited
    old_umask = os.umask(0o022)
    try:
        editor.save(tmp_path / "edits")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "edits").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "edits").iterdir()} == {0o644}


@pytest.mark.parametrize("step", ["weights", "commit", "cleanup"])
def test_a_failure_at_any_step_of_a_replacing_save_leaves_a_complete_save(edited, tmp_path, monkeypatch, step):
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)  # one block
    editor.edit_texts(["Water boils at"], ["fifty"], family.tokenizer)  # now two

    class Injected(Exception):
        pass

    def fail(*args, **kwargs):
        raise Injected

    if step == "weights":
        monkeypatch.setattr(checkpoint, "save_file", fail)
    elif step == "commit":
        monkeypatch.setattr(checkpoint.os, "replace", fail)
    else:
        real_unlink = checkpoint.Path.unlink

        def fail_on_old_weights(self, *args, **kwargs):
            if self.name.startswith("melo_edits."):
                raise Injected
            return real_unlink(self, *args, **kwargs)

        monkeypatch.setattr(checkpoint.Path, "unlink", fail_on_old_weights)
    with pytest.raises(Injected):
        editor.save(path)
    monkeypatch.undo()
    # The old save before the commit point, the new one after it; never nothing.
    assert loaded_blocks(path) == (2 if step == "cleanup" else 1)


def test_load_errors_name_the_file_and_leave_the_model_unpatched(edited, tmp_path):
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    weights = path / json.loads((path / checkpoint.CONFIG_FILE).read_text())["weights_file"]
    good = weights.read_bytes()

    fresh = build("gpt2")
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=f"{weights.name} is corrupted"):
        melo_fast.load(fresh.model, path)
    assert getattr(fresh.model, "_melo_editor", None) is None
    weights.write_bytes(b"\x00" * 64)  # corrupt
    with pytest.raises(ValueError, match=f"{weights.name} is corrupted"):
        melo_fast.load(fresh.model, path)
    weights.unlink()  # missing
    with pytest.raises(FileNotFoundError, match=f"{weights.name} is missing"):
        melo_fast.load(fresh.model, path)
    assert getattr(fresh.model, "_melo_editor", None) is None

    weights.write_bytes(good)  # repaired: the same model loads now, no "already patched"
    melo_fast.load(fresh.model, path)
    assert torch.equal(logits(fresh), logits(family))


def test_a_version_1_save_still_loads(edited, tmp_path):
    """Saves written before the atomic layout (fixed weights file name, format 1) stay readable."""
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    meta = json.loads((path / checkpoint.CONFIG_FILE).read_text())
    (path / meta.pop("weights_file")).rename(path / checkpoint.VERSION_1_WEIGHTS)
    meta["format_version"] = 1
    del meta["sha256"]  # recorded since format 2
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    fresh = build("gpt2")
    melo_fast.load(fresh.model, path)
    assert torch.equal(logits(fresh), logits(family))


@pytest.mark.parametrize("named", ["../victim.txt", "absolute"])
def test_a_config_naming_a_file_outside_the_folder_is_refused_and_the_file_kept(edited, tmp_path, named):
    """The weights file name comes from inside the folder: a save must not delete, nor a load read, another file."""
    _, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    victim = tmp_path / "victim.txt"
    victim.write_text("my notes")
    meta = json.loads((path / checkpoint.CONFIG_FILE).read_text())
    meta["weights_file"] = str(victim) if named == "absolute" else named
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    before = listing(path)
    unsafe = re.escape(f"names the weights file {meta['weights_file']!r}, which is not a name melo_fast writes")
    with pytest.raises(ValueError, match=unsafe):
        editor.save(path)
    with pytest.raises(ValueError, match=unsafe):
        melo_fast.load(build("gpt2").model, path)
    assert victim.read_text() == "my notes" and listing(path) == before


def test_a_load_racing_a_save_reads_the_new_save(edited, tmp_path, monkeypatch):
    """A save landing between the reader's read of the config and of the weights deletes the weights it named."""
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)  # one block
    editor.edit_texts(["Water boils at"], ["fifty"], family.tokenizer)  # now two
    real_load_file, opened = checkpoint.load_file, []

    def save_then_load(file):
        opened.append(file)
        if len(opened) == 1:
            editor.save(path)  # replaces the config and deletes the weights file the reader is about to open
        return real_load_file(file)

    monkeypatch.setattr(checkpoint, "load_file", save_then_load)
    assert loaded_blocks(path) == 2
    assert len(opened) == 2 and opened[0] != opened[1]


def test_a_load_gives_up_clearly_while_saves_keep_replacing_the_folder(edited, tmp_path, monkeypatch):
    _, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    real_load_file, opened = checkpoint.load_file, []

    def save_then_load(file):
        opened.append(file)
        editor.save(path)  # every read loses the race
        return real_load_file(file)

    monkeypatch.setattr(checkpoint, "load_file", save_then_load)
    with pytest.raises(FileNotFoundError, match=f"replaced by another save each of the {checkpoint.READ_TRIES} times"):
        checkpoint.read(path)
    assert len(opened) == checkpoint.READ_TRIES


def flip_last_byte(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: safetensors still parses the file, a value changes
    file.write_bytes(bytes(data))


def test_a_flipped_byte_in_any_file_of_a_save_is_refused_on_load_and_reload(edited, tmp_path):
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    meta = json.loads((path / checkpoint.CONFIG_FILE).read_text())
    weights = path / meta["weights_file"]
    good_weights, good_config = weights.read_bytes(), (path / checkpoint.CONFIG_FILE).read_text()
    serving = build("gpt2")
    server = melo_fast.load(serving.model, path)
    state = server.state

    flip_last_byte(weights)
    checkpoint.load_file(str(weights))  # still a readable safetensors file: only the checksum tells
    corrupted = f"{re.escape(str(weights))} is corrupted"
    fresh = build("gpt2")
    with pytest.raises(ValueError, match=corrupted):
        melo_fast.load(fresh.model, path)
    assert getattr(fresh.model, "_melo_editor", None) is None
    with pytest.raises(ValueError, match=corrupted):
        server.reload(path)
    assert server.state is state

    weights.write_bytes(good_weights)
    label = meta["database"]["labels"][0]
    changed = good_config.replace(f"{label[0]}", f"{label[0] + 1}", 1)  # one digit of an edit's label
    assert changed != good_config and json.loads(changed)["database"]["labels"][0] != label
    (path / checkpoint.CONFIG_FILE).write_text(changed)
    with pytest.raises(ValueError, match=f"{re.escape(str(path / checkpoint.CONFIG_FILE))} is corrupted"):
        melo_fast.load(fresh.model, path)
    with pytest.raises(ValueError, match="corrupted"):
        server.reload(path)
    assert server.state is state

    (path / checkpoint.CONFIG_FILE).write_text(good_config)  # repaired: loads
    melo_fast.load(fresh.model, path)
    assert torch.equal(logits(fresh), logits(family))


def test_a_save_without_checksums_still_loads(edited, tmp_path):
    """Saves written before checksums were recorded load unchecked."""
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    meta = json.loads((path / checkpoint.CONFIG_FILE).read_text())
    del meta["sha256"]
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    fresh = build("gpt2")
    melo_fast.load(fresh.model, path)
    assert torch.equal(logits(fresh), logits(family))
    weights = path / meta["weights_file"]
    weights.write_bytes(weights.read_bytes()[:100])  # unchecked, a truncation is still caught by the parser
    with pytest.raises(ValueError, match=f"{weights.name} is not a readable safetensors file"):
        melo_fast.load(build("gpt2").model, path)


def test_a_save_is_refused_on_another_model_unless_told(edited, tmp_path):
    """The database holds one model's keys: on other weights an edited prompt would route to none."""
    family, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    another = r"made on another model.*transformer\.h\.1\.mlp\.c_fc.*check_model=False"
    other = build("gpt2", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match=another):
        melo_fast.load(other.model, path)
    assert getattr(other.model, "_melo_editor", None) is None
    deeper = build("gpt2")
    deeper = type(deeper.model)(deeper.model.config.__class__(**{**deeper.model.config.to_dict(), "n_layer": 6}))
    with pytest.raises(ValueError, match="made on another model"):
        melo_fast.load(deeper.eval(), path)
    assert melo_fast.load(other.model, path, check_model=False).num_blocks == 1  # the explicit override

    # reload: a serving editor refuses a save of another model's edits, state unchanged, unless told.
    other_editor = melo_fast.patch(build("gpt2", seed=1).model, editor.config)
    other_editor.save(tmp_path / "other")
    state = editor.state
    with pytest.raises(ValueError, match=another):
        editor.reload(tmp_path / "other")
    assert editor.state is state
    editor.reload(tmp_path / "other", check_model=False)
    assert editor.num_blocks == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_save_loads_on_a_copy_of_the_same_weights_in_another_dtype(edited, tmp_path, dtype):
    family, editor = edited
    editor.save(tmp_path / "fp32")
    assert melo_fast.load(build("gpt2").model.to(dtype), tmp_path / "fp32").num_blocks == 1
    low = melo_fast.patch(build("gpt2").model.to(dtype), editor.config)  # as a GPU bf16 model saves
    low.save(tmp_path / "low")
    melo_fast.load(build("gpt2").model, tmp_path / "low")  # onto the fp32 CPU copy


def test_a_save_without_a_model_fingerprint_loads_on_any_model_that_fits(edited, tmp_path):
    _, editor = edited
    path = tmp_path / "edits"
    editor.save(path)
    meta = json.loads((path / checkpoint.CONFIG_FILE).read_text())
    del meta["model_fingerprint"], meta["sha256"]  # as saves before fingerprints were recorded
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
    assert melo_fast.load(build("gpt2", seed=1).model, path).num_blocks == 1
