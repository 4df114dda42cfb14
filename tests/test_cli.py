"""`python -m melo_fast env` tells which backends work here; `inspect` tells what patch() would choose."""

import subprocess
import sys
from pathlib import Path

import pytest

import melo_fast
from melo_fast.cli import main
from tests.tiny_models import build


def test_env_lists_every_backend():
    done = subprocess.run([sys.executable, "-m", "melo_fast", "env"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    for backend in ("reference", "torch", "cpp", "triton"):
        assert f"backend {backend}" in done.stdout
    assert "backend torch     available" in done.stdout


def inspected(capsys, folder) -> dict[str, str]:
    """Run `inspect` and return its router, key width and targets."""
    main(["inspect", str(folder)])
    lines = capsys.readouterr().out.splitlines()
    fields = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in lines if line[:1].isalpha()}
    targets = [fields["targets"]] + [line.strip() for line in lines if line.startswith(" " * 11)]
    return {"router": fields["router"].split(" (")[0], "key width": fields["key width"], "targets": targets,
            "layers": fields["layers"]}


def test_inspect_a_saved_model_prints_what_patch_chooses(capsys, tmp_path):
    family = build("bart")
    family.model.save_pretrained(tmp_path)  # config.json + weights
    shown = inspected(capsys, tmp_path)
    editor = melo_fast.patch(family.model)
    assert shown["router"] == editor.config.router
    assert shown["targets"] == list(editor.config.targets)
    assert shown["key width"] == "64"
    assert shown["layers"] == "model.encoder.layers (4 layers, encoder), model.decoder.layers (4 layers, decoder)"


def test_inspect_a_bare_config_gives_names_any_head_class_accepts(capsys, tmp_path):
    family = build("qwen2_moe")
    family.model.config.save_pretrained(tmp_path)  # config.json only, without "architectures"
    shown = inspected(capsys, tmp_path)
    assert shown["router"] == "layers.1.mlp.shared_expert.up_proj"  # the bare Qwen2MoeModel's name
    assert shown["key width"] == "128"
    # patch() takes them as suffixes: on the causal-LM class they name the same modules as its defaults.
    explicit = melo_fast.patch(family.model, melo_fast.MeloConfig(router=shown["router"], targets=shown["targets"]))
    melo_fast.unpatch(family.model)
    default = melo_fast.patch(family.model)
    assert (explicit.config.router, explicit.config.targets) == (default.config.router, default.config.targets)


def test_inspect_without_a_config_says_so(tmp_path):
    with pytest.raises(SystemExit, match="has no config.json"):
        main(["inspect", str(tmp_path)])


def test_projection_trains_a_key_projection_that_patch_takes(capsys, tmp_path):
    """`projection` on a saved tiny GPT-2 and 40 zsRE dev records writes a projection the model patches with."""
    import json

    from tests.conftest import ZSRE_DEV

    family = build("gpt2")
    family.model.save_pretrained(tmp_path / "model")
    family.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "data.json").write_text(json.dumps(json.loads(ZSRE_DEV.read_text())[:40]))
    main(["projection", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.json"),
          "--out", str(tmp_path / "p.safetensors"), "--rank", "8", "--steps", "20", "--conflict-rule", "split",
          "--no-number-negatives"])
    out = capsys.readouterr().out
    assert "use it: melo_fast.patch(model, MeloConfig(router=" in out
    projection = melo_fast.KeyProjection.load(tmp_path / "p.safetensors")
    stopped = projection.info["held_out"]["stopped_by"]  # the questions that kept the radius from growing, shown
    assert "stopped_by" not in out.split("held-out facts: ")[1].splitlines()[0]
    assert stopped["radius"] is None or (f"at radius {stopped['radius']} the held-out folds let in" in out
                                         and repr(stopped["questions"][0]["question"]) in out)
    assert projection.out_dim == 8 and projection.info["facts"] >= 10 and projection.info["folds"] == 5
    assert projection.info["number_negatives"] == 0  # --no-number-negatives: the records' own negatives only
    config = melo_fast.MeloConfig(router=projection.router, key_position=projection.key_position)
    editor = melo_fast.patch(family.model, config, tokenizer=family.tokenizer, key_projection=projection)
    assert editor.db.dim == 8 and projection.conflict_rule == editor.db.conflict_rule == "split"
