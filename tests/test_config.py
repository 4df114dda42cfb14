"""MeloConfig: JSON round-trip, validation, its three parts, defaults per architecture."""

import dataclasses

import pytest

import melo_fast
from melo_fast.targets import default_layers
from tests.tiny_models import FAMILIES, build


def test_json_round_trip():
    config = melo_fast.MeloConfig(
        router="h.1.mlp.c_fc",
        targets=["h.2.mlp.c_fc"],
        rank_per_block=2,
        init_radius=0.3,
        key_position=-1,
        backend="torch",
        scale=4.0,
    )
    assert melo_fast.MeloConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "field, value",
    [
        ("rank_per_block", 0),
        ("init_radius", -1.0),
        ("key_position", "first"),
        ("key_position", True),
        ("edit_lr", 0),
        ("edit_lr", 1e30),  # Adam steps are lr-sized: above 1 they dwarf any weight
        ("edit_lr", float("nan")),
        ("scale", float("inf")),
        ("init_radius", float("inf")),
        ("relative_radius", float("nan")),
        ("conflict_rule", "merge"),
        ("stop_loss", float("inf")),
        ("num_iter", 0),
        ("scheduler_gamma", 1.5),
        ("scale", 0),
        ("backend", "cuda"),
        ("targets", []),
        ("targets", ["a", "a"]),
        ("router", ""),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"MeloConfig.{field}="):
        melo_fast.MeloConfig(**{field: value})


def test_unknown_field_in_json():
    with pytest.raises(ValueError, match="unknown field"):
        melo_fast.MeloConfig.from_dict({"num_blocks": 20})


def test_paper_layer_rule():
    assert default_layers(8) == (4, [5, 6])  # T5-small-ssm-nq in the paper
    assert default_layers(2) == (0, [1])
    assert default_layers(1) == (0, [0])


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_patches_with_defaults(name):
    family = build(name)
    editor = melo_fast.patch(family.model)
    assert editor.config.router and editor.config.targets
    assert set(editor.lora_layers) == set(editor.config.targets)


def test_the_three_parts_and_the_backend_partition_the_fields():
    from melo_fast.config import MeloConfig, PatchSpec, RadiusPolicy, TrainSettings

    parts = [{f.name for f in dataclasses.fields(part)} for part in (PatchSpec, TrainSettings, RadiusPolicy)]
    every = {f.name for f in dataclasses.fields(MeloConfig)}
    assert sum(len(p) for p in parts) + 1 == len(every)  # disjoint, and the backend besides
    assert set().union(*parts) | {"backend"} == every


def test_the_parts_read_the_current_fields():
    config = melo_fast.MeloConfig(targets="h.2.mlp.c_fc", init_radius=0.5)
    assert config.targets == ("h.2.mlp.c_fc",) and config.patch_spec.targets == ("h.2.mlp.c_fc",)
    assert config.radius_policy.absolute == 0.5 and melo_fast.MeloConfig().radius_policy.absolute is None
    assert melo_fast.MeloConfig(relative_radius=0.2).radius_policy.from_key_scale(3.0) == 0.2 * 3.0
    assert config.replace(num_iter=7).train_settings.num_iter == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.patch_spec.scale = 1.0


def test_a_config_cannot_change_after_creation():
    config = melo_fast.MeloConfig(targets=["h.2.mlp.c_fc"])
    for field, value in (("num_iter", 7), ("scale", 1.0), ("targets", ["h.3.mlp.c_fc"])):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, field, value)
    assert config.targets == ("h.2.mlp.c_fc",)  # a tuple: no change in place either
    assert config.to_dict()["targets"] == ["h.2.mlp.c_fc"]  # the JSON face keeps a list
    assert melo_fast.MeloConfig.from_json(config.to_json()) == config


def test_a_live_editor_takes_new_training_settings_but_never_a_new_patch():
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5, stop_loss=None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        editor.config.num_iter = 2
    editor.config = editor.config.replace(num_iter=2, edit_lr=0.5)  # read by the next edit
    assert editor.config.train_settings.num_iter == 2
    result = editor.edit_texts(["The sky is"], ["green"], family.tokenizer)
    assert result.steps == 2
    for change in (dict(scale=1.0), dict(rank_per_block=2), dict(init_radius=0.5), dict(backend="reference")):
        field = next(iter(change))
        with pytest.raises(ValueError, match=f"{field}.*fixed while the model is patched"):
            editor.config = editor.config.replace(**change)
    with pytest.raises(TypeError, match="MeloConfig"):
        editor.config = {"num_iter": 3}
    assert editor.config.num_iter == 2 and editor.config.scale == 20.0


def test_patch_spec_differences_name_what_differs_as_reload_reports_it():
    here = melo_fast.MeloConfig(router="h.1.mlp.c_fc", targets=["h.2.mlp.c_fc"], num_iter=5).patch_spec
    saved = melo_fast.MeloConfig(router="h.1.mlp.c_fc", targets=["h.3.mlp.c_fc"], scale=4.0).patch_spec
    assert here.differences(saved) == [
        "targets: saved ['h.3.mlp.c_fc'], here ['h.2.mlp.c_fc']",
        "scale: saved 4.0, here 20.0",
    ]
    assert here.differences(here) == []
