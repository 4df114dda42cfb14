"""An edit given in several wordings: its rows (``paraphrase_of``) and the radius of their keys.

``melo_fast/vecdb/wordings.py`` checks which rows word which prompt and gives the keys of an edit with
paraphrases the radius for their number (``VectorDatabase.insert(..., radii=...)``); the editor uses it for
``edit_texts(..., paraphrases=...)`` and for ``edit``/``open_block`` given ``paraphrase_of``.
"""

from __future__ import annotations

import pytest
import torch

import melo_fast
from melo_fast import KeyProjection
from melo_fast.editing import build_edit_batch
from melo_fast.vecdb import VectorDatabase
from melo_fast.vecdb.wordings import check_paraphrase_of, wording_radii
from tests.tiny_models import build

RED, BLUE = (1,), (2,)


def radius_for(k: int) -> float:
    return {0: 1.0, 1: 0.7, 2: 0.5}[k]


def test_the_keys_of_an_edit_with_paraphrases_get_the_radius_for_their_number():
    # Rows: prompt 0 (red), prompt 1 (blue, alone), then two paraphrases of prompt 0.
    paraphrase_of = [0, 1, 0, 0]
    check_paraphrase_of(paraphrase_of, [RED, BLUE, RED, RED])  # a valid batch: no error
    assert wording_radii(paraphrase_of, radius_for) == [0.5, 1.0, 0.5, 0.5]
    assert wording_radii([0, 1, 1], radius_for) == [1.0, 0.7, 0.7]  # one paraphrase of prompt 1
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    db = VectorDatabase(dim=2, init_radius=1.0)
    db.insert(keys, [RED, BLUE, RED, RED], 0, radii=wording_radii(paraphrase_of, radius_for))
    assert db.num_clusters == 4 and db.radii.tolist() == [0.5, 1.0, 0.5, 0.5]
    # Each wording routes home (it is its own cluster's center); 0.7 from one is outside its 0.5 radius.
    assert db.search(torch.cat([keys, torch.tensor([[0.7, 0.0], [10.7, 0.0]])])).tolist() == [0, 0, 0, 0, -1, 0]


def test_bad_wordings_are_refused_naming_the_row():
    cases = [
        ([0, 1], "2 entries for 3 rows"),
        ([0, 0, 5], r"paraphrase_of\[2\] = 5 is not a row"),
        ([0, 0, 1], r"paraphrase_of\[2\] = 1 points at a paraphrase"),
    ]
    for paraphrase_of, message in cases:
        with pytest.raises(ValueError, match=message):
            check_paraphrase_of(paraphrase_of, [RED, RED, RED])
    with pytest.raises(ValueError, match="row 1 words row 0 but asks for another target"):
        check_paraphrase_of([0, 0, 2], [RED, BLUE, RED])
    with pytest.raises(ValueError, match=r"an edit with 1 paraphrase\(s\) must be a finite number > 0, got 0.0"):
        wording_radii([0, 0, 2], lambda k: 0.0 if k else 1.0)
    with pytest.raises(ValueError, match=r"radii must be 2 finite numbers > 0 \(one per key\), got 1"):
        VectorDatabase(dim=2, init_radius=1.0).insert(torch.zeros(2, 2), [RED, RED], 0, radii=[1.0])
    db = VectorDatabase(dim=2, init_radius=1.0)
    with pytest.raises(ValueError, match=r"\(key, radius\) \[\(1, nan\)\] are not"):
        db.insert(torch.eye(2), [RED, BLUE], 0, radii=[1.0, float("nan")])
    assert len(db) == 0


def _editor_with_projection(paraphrase_radii: dict[int, float] | None):
    family = build("gpt2")
    probe = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    router, width = probe.config.router, probe.router.key_width
    melo_fast.unpatch(family.model)
    generator = torch.Generator().manual_seed(1)
    projection = KeyProjection(torch.randn(width, generator=generator), torch.rand(width, generator=generator) + 0.5,
                               torch.randn(8, width, generator=generator), 0.2, router, "last",
                               paraphrase_radii=paraphrase_radii)
    config = melo_fast.MeloConfig(num_iter=2)
    return family, melo_fast.patch(family.model, config, tokenizer=family.tokenizer, key_projection=projection)


def _radius_of_each_point(editor) -> list[float]:
    """The radius of the cluster holding each stored point, in insertion order (one block here)."""
    db = editor.db
    sizes = (db.point_offsets[1:] - db.point_offsets[:-1]).tolist()
    return [radius for radius, size in zip(db.radii.tolist(), sizes, strict=True) for _ in range(size)]


def test_edit_texts_gives_an_edit_with_paraphrases_the_projections_radius_for_their_number():
    family, editor = _editor_with_projection(paraphrase_radii={1: 0.15, 2: 0.1})
    prompts, targets = ["The capital of France is", "Dogs like to chase"], ["Rome", "cats"]
    paraphrases = [["France's capital city is", "The French capital is"], []]
    editor.edit_texts(prompts, targets, family.tokenizer, paraphrases=paraphrases)
    assert len(editor.db) == 4 and editor.db.init_radius == pytest.approx(0.2)
    texts = [*prompts, *paraphrases[0]]
    # The three wordings of the edit with 2 paraphrases: radius_for(2) = 0.1; the prompt without any: 0.2.
    assert sorted(_radius_of_each_point(editor)) == pytest.approx([0.1, 0.1, 0.1, 0.2], abs=1e-6)
    assert editor.route(family.tokenizer(texts, return_tensors="pt", padding=True)).tolist() == [0, 0, 0, 0]


def test_without_a_paraphrase_radius_an_edit_in_several_wordings_keeps_the_radius():
    family, editor = _editor_with_projection(paraphrase_radii=None)
    editor.edit_texts(["The capital of France is"], ["Rome"], family.tokenizer,
                      paraphrases=[["France's capital city is"]])
    assert _radius_of_each_point(editor) == pytest.approx([0.2, 0.2], abs=1e-6)


def test_edit_refuses_a_bad_paraphrase_of_before_training():
    family, editor = _editor_with_projection(paraphrase_radii={1: 0.5})
    batch = build_edit_batch(family.model, ["a b c", "d e f"], ["x", "y"], family.tokenizer)
    with pytest.raises(ValueError, match="row 1 words row 0 but asks for another target"):
        editor.edit(batch, paraphrase_of=[0, 0])
    assert len(editor.db) == 0 and editor.num_blocks == 0
