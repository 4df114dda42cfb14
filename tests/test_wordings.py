"""An edit given in several wordings becomes one cluster around their mean, with a radius of its own.

``insert_wordings`` (``melo_fast/vecdb/wordings.py``) places the prompts first and the paraphrases second,
so a paraphrase joins its own prompt's cluster instead of making one more; the editor uses it for
``edit_texts(..., paraphrases=...)`` and for ``edit``/``open_block`` given ``paraphrase_of``.
"""

from __future__ import annotations

import pytest
import torch

import melo_fast
from melo_fast import KeyProjection
from melo_fast.editing import build_edit_batch
from melo_fast.vecdb import VectorDatabase
from melo_fast.vecdb.wordings import insert_wordings
from tests.tiny_models import build

RED, BLUE = (1,), (2,)


def test_an_edits_wordings_become_one_cluster_around_their_mean():
    # Rows: prompt 0 (red) at the origin, prompt 1 (blue) far away, then two paraphrases of prompt 0.
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.8, 0.0], [0.0, 0.8]])
    labels, paraphrase_of = [RED, BLUE, RED, RED], [0, 1, 0, 0]
    db = VectorDatabase(dim=2, init_radius=1.0)
    counts = insert_wordings(db, keys, labels, 0, paraphrase_of, paraphrase_radius=0.5)
    assert (counts.new_clusters, counts.merged, counts.conflicts) == (2, 2, 0) and db.num_clusters == 2
    torch.testing.assert_close(db.centers[0], keys[[0, 2, 3]].mean(0))
    spread = (keys[[0, 2, 3]] - keys[[0, 2, 3]].mean(0)).norm(dim=1).max().item()
    assert db.radii[0].item() == pytest.approx(max(spread, 0.5), rel=1e-3)  # the worded edit's own radius
    assert db.radii[1].item() == 1.0  # a prompt without paraphrases keeps init_radius (MELO)
    assert db.search(keys).tolist() == [0, 0, 0, 0]
    # MELO's one insert: every wording its own cluster, each a ball of init_radius.
    plain = VectorDatabase(dim=2, init_radius=1.0)
    plain.insert(keys, labels, 0)
    assert plain.num_clusters == 4


def test_bad_wordings_are_refused_naming_the_row_and_change_nothing():
    keys = torch.randn(3, 2)
    db = VectorDatabase(dim=2, init_radius=1.0)
    cases = [
        ([0, 1], "2 entries for 3 rows"),
        ([0, 0, 5], r"paraphrase_of\[2\] = 5 is not a row"),
        ([0, 0, 1], r"paraphrase_of\[2\] = 1 points at a paraphrase"),
    ]
    for paraphrase_of, message in cases:
        with pytest.raises(ValueError, match=message):
            insert_wordings(db, keys, [RED, RED, RED], 0, paraphrase_of, 0.5)
    with pytest.raises(ValueError, match="row 1 words row 0 but asks for another target"):
        insert_wordings(db, keys, [RED, BLUE, RED], 0, [0, 0, 2], 0.5)
    with pytest.raises(ValueError, match="paraphrase_radius must be a finite number > 0"):
        insert_wordings(db, keys, [RED, RED, RED], 0, [0, 0, 0], 0.0)
    with pytest.raises(ValueError, match="same input with different targets"):
        insert_wordings(db, torch.zeros(3, 2), [RED, RED, BLUE], 0, [0, 0, 2], 0.5)
    assert len(db) == 0


def _editor_with_projection(paraphrase_radius: float | None):
    family = build("gpt2")
    probe = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    router, width = probe.config.router, probe.router.key_width
    melo_fast.unpatch(family.model)
    generator = torch.Generator().manual_seed(1)
    projection = KeyProjection(torch.randn(width, generator=generator), torch.rand(width, generator=generator) + 0.5,
                               torch.randn(8, width, generator=generator), 0.2, router, "last",
                               paraphrase_radius=paraphrase_radius)
    config = melo_fast.MeloConfig(num_iter=2)
    return family, melo_fast.patch(family.model, config, tokenizer=family.tokenizer, key_projection=projection)


def test_edit_texts_gives_an_edit_with_paraphrases_the_projections_paraphrase_radius():
    family, editor = _editor_with_projection(paraphrase_radius=1.5)
    prompts, targets = ["The capital of France is", "Dogs like to chase"], ["Rome", "cats"]
    paraphrases = [["France's capital city is", "The French capital is"], []]
    editor.edit_texts(prompts, targets, family.tokenizer, paraphrases=paraphrases)
    # A radius of 1.5 on unit keys: both paraphrases join their prompt's cluster (same block, one cluster).
    assert len(editor.db) == 4 and editor.db.num_clusters == 2
    radii = sorted(editor.db.radii.tolist())
    assert radii[0] == pytest.approx(0.2) and radii[1] >= 1.5 - 1e-6  # the prompt alone keeps the radius
    texts = [*prompts, *paraphrases[0]]
    assert editor.route(family.tokenizer(texts, return_tensors="pt", padding=True)).tolist() == [0, 0, 0, 0]


def test_without_a_paraphrase_radius_an_edit_in_several_wordings_keeps_the_radius():
    family, editor = _editor_with_projection(paraphrase_radius=None)
    editor.edit_texts(["The capital of France is"], ["Rome"], family.tokenizer,
                      paraphrases=[["France's capital city is"]])
    assert editor.db.init_radius == pytest.approx(0.2)
    assert min(editor.db.radii.tolist()) >= 0.2 - 1e-6


def test_edit_refuses_a_bad_paraphrase_of_before_training():
    family, editor = _editor_with_projection(paraphrase_radius=0.5)
    batch = build_edit_batch(family.model, ["a b c", "d e f"], ["x", "y"], family.tokenizer)
    with pytest.raises(ValueError, match="row 1 words row 0 but asks for another target"):
        editor.edit(batch, paraphrase_of=[0, 0])
    assert len(editor.db) == 0 and editor.num_blocks == 0
