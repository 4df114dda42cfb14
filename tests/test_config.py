"""MeloConfig: JSON round-trip, validation, defaults per architecture."""

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
