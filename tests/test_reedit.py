"""Re-editing a fact: the later edit wins (DESIGN §2.10), on hand-made keys and on a model."""

import pytest
import torch

import melo_fast
from melo_fast.editor import build_edit_batch
from melo_fast.vecdb import COINCIDE_FRACTION, SPLIT_MARGIN, VectorDatabase
from tests.tiny_models import build

RADIUS = 1.0
RED, BLUE, GREEN = (7,), (8,), (9,)


def keys(*points):
    return torch.tensor(points, dtype=torch.float32)


def test_a_key_on_a_stored_point_of_another_label_takes_it_over():
    db = VectorDatabase(dim=2, init_radius=RADIUS)
    db.insert(keys([0, 0], [5, 5]), [RED, GREEN], 0)
    counts = db.insert(keys([0, 0]), [BLUE], 1)  # the same input, corrected
    assert counts.superseded == 1 and counts.conflicts == 0 and counts.forgotten == 0
    assert db.search(keys([0, 0], [0.3, 0], [5, 5])).tolist() == [1, 1, 0]
    # MELO's own rule would have split at distance 0: radii -1e-5 / +1e-5, dropping both edits.
    assert db.radii.min().item() == RADIUS


def test_within_the_tolerance_counts_as_the_same_input():
    db = VectorDatabase(dim=2, init_radius=RADIUS)
    db.insert(keys([0, 0]), [RED], 0)
    noise = 0.9 * COINCIDE_FRACTION * RADIUS
    counts = db.insert(keys([noise, 0]), [BLUE], 1)
    assert counts.superseded == 1
    assert db.search(keys([0, 0])).tolist() == [1]


def test_a_conflict_at_a_real_distance_still_splits():
    db = VectorDatabase(dim=2, init_radius=RADIUS)
    db.insert(keys([0, 0]), [RED], 0)
    counts = db.insert(keys([0.5, 0]), [BLUE], 1)  # 0.5 > tolerance 0.1: another input
    assert counts.superseded == 0 and counts.conflicts == 1
    assert sorted(db.radii.tolist()) == pytest.approx([0.25 - SPLIT_MARGIN, 0.25 + SPLIT_MARGIN])
    assert db.search(keys([0, 0], [0.5, 0])).tolist() == [0, 1]


def test_re_editing_one_member_of_a_merged_cluster_keeps_the_other():
    db = VectorDatabase(dim=2, init_radius=RADIUS)
    db.insert(keys([0, 0]), [RED], 0)
    db.insert(keys([1.5, 0]), [RED], 1)  # same label nearby: merged, center 0.75
    assert db.num_clusters == 1
    counts = db.insert(keys([0, 0]), [BLUE], 2)
    assert counts.superseded == 1 and counts.forgotten == 0
    # The point left keeps its own block; the corrected input routes to the new one.
    assert db.search(keys([1.5, 0], [0, 0])).tolist() == [1, 2]
    assert db.stats()["points"] == 2


def test_a_batch_with_the_same_input_twice_and_two_targets_is_refused():
    db = VectorDatabase(dim=2, init_radius=RADIUS)
    db.insert(keys([3, 3]), [GREEN], 0)
    before = {name: t.clone() for name, t in db.state_dict()[0].items()}
    with pytest.raises(ValueError, match=r"rows \[\(0, 2\)\]"):
        db.insert(keys([0, 0], [9, 9], [0, 0]), [RED, GREEN, BLUE], 1)
    assert all(torch.equal(before[name], t) for name, t in db.state_dict()[0].items())


def greedy(family, prompt, tokens=1):
    inputs = family.tokenizer([prompt], return_tensors="pt")
    pad = family.tokenizer.eos_token_id
    out = family.model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    return family.tokenizer.decode(out[0, inputs.input_ids.shape[1] :])


def test_correcting_an_edit_on_a_model():
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=30), tokenizer=family.tokenizer)
    editor.edit_texts(["The capital of France is", "Water boils at"], [" red", " fifty"], family.tokenizer)
    assert greedy(family, "The capital of France is") == " red"
    result = editor.edit_texts(["The capital of France is"], [" blue"], family.tokenizer)
    assert result.superseded == 1 and result.conflicts == 0
    assert greedy(family, "The capital of France is") == " blue"
    assert greedy(family, "Water boils at") == " fifty"  # the other edit of the first batch stays


def test_an_edit_batch_asking_two_answers_for_one_input_is_refused_before_any_work():
    family = build("gpt2")
    editor = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5), tokenizer=family.tokenizer)
    editor.edit_texts(["Water boils at"], [" fifty"], family.tokenizer)
    state = editor.state
    batch = build_edit_batch(
        family.model, ["The sky is", "Dogs bark", "The sky is"], [" red", " loud", " blue"], family.tokenizer
    )
    with pytest.raises(ValueError, match=r"rows \[\(0, 2\)\] are the same input"):
        editor.edit(batch)
    assert editor.state is state and not editor.block_is_open
