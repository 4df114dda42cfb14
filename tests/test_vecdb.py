"""Every insert rule of the vector database (DESIGN §1) on hand-made 2-D keys."""

import pytest
import torch

from melo_fast.vecdb import SPLIT_MARGIN, VectorDatabase

RADIUS = 1.0
A, B = (7,), (8,)  # two edit labels


def keys(*points):
    return torch.tensor(points, dtype=torch.float32)


def fresh():
    return VectorDatabase(dim=2, init_radius=RADIUS)


def test_empty_database_makes_one_cluster_per_key_even_for_equal_labels():
    db = fresh()
    counts = db.insert(keys([0, 0], [0.1, 0], [5, 5]), [A, A, B], block_id=0)
    assert counts.new_clusters == 3 and db.num_clusters == 3 and len(db) == 3
    assert db.radii.tolist() == [RADIUS] * 3
    assert db.search(keys([0.05, 0], [9, 9])).tolist() == [0, -1]


def test_far_key_makes_a_new_cluster():
    db = fresh()
    db.insert(keys([0, 0]), [A], 0)
    counts = db.insert(keys([2.5, 0]), [A], 1)  # 2.5 > radius + init_radius = 2
    assert counts.new_clusters == 1 and db.num_clusters == 2
    assert db.search(keys([2.5, 0.1], [0, 0.1])).tolist() == [1, 0]


def test_same_label_within_reach_expands_the_cluster():
    db = fresh()
    db.insert(keys([0, 0]), [A], 0)
    counts = db.insert(keys([1.5, 0]), [A], 1)  # within radius + init_radius
    assert counts.merged == 1 and db.num_clusters == 1 and len(db) == 2
    assert torch.allclose(db.centers[0], torch.tensor([0.75, 0.0]))
    assert db.radii[0].item() == pytest.approx(RADIUS)  # max point distance 0.75 < init_radius
    # The nearest point decides the block inside the cluster.
    assert db.search(keys([0.1, 0], [1.4, 0])).tolist() == [0, 1]


def test_expansion_radius_grows_to_the_farthest_point():
    db = fresh()
    db.insert(keys([0, 0]), [A], 0)
    db.insert(keys([1.9, 0]), [A], 1)
    db.insert(keys([2.5, 0]), [A], 2)  # 1.55 from center 0.95: within radius 1 + init_radius 1
    assert db.num_clusters == 1 and len(db) == 3
    center = (0 + 1.9 + 2.5) / 3
    assert torch.allclose(db.centers[0], torch.tensor([center, 0.0]))
    assert db.radii[0].item() == pytest.approx(center)  # the point at 0 is the farthest, beyond init_radius


def test_conflict_splits_clusters_and_forgets_points_outside():
    db = fresh()
    db.insert(keys([0, 0]), [A], 0)
    db.insert(keys([0.8, 0]), [A], 1)  # merged: center 0.4, points at 0 and 0.8
    counts = db.insert(keys([1.6, 0]), [B], 2)  # different label at distance 1.2 from center 0.4
    assert counts.conflicts == 1 and counts.new_clusters == 0
    assert db.num_clusters == 2
    assert db.radii[0].item() == pytest.approx(0.6 - SPLIT_MARGIN)
    assert db.radii[1].item() == pytest.approx(0.6 + SPLIT_MARGIN)
    # Point 0.8 is 0.4 from center 0.4 (kept); point 0 is 0.4 away too (kept): nothing forgotten.
    assert counts.forgotten == 0 and len(db) == 3
    assert db.search(keys([1.5, 0], [0.1, 0])).tolist() == [2, 0]


def test_conflict_forgets_points_now_outside_the_shrunk_radius():
    db = fresh()
    db.insert(keys([0, 0]), [A], 0)
    db.insert(keys([1.0, 0]), [A], 1)  # center 0.5, radius 1 (init), points 0 and 1.0
    counts = db.insert(keys([1.3, 0]), [B], 2)  # distance 0.8 -> old radius 0.4 - margin
    assert counts.conflicts == 1
    assert counts.forgotten == 2  # both old points are 0.5 from the center: outside 0.4
    stats = db.stats()
    assert stats == {
        "clusters": 2, "points": 1, "conflicts": 1, "forgotten_points": 2, "superseded_points": 0, "blocks_used": 1
    }
    # The emptied cluster keeps its center and now routes to "none".
    assert db.search(keys([0.5, 0], [1.3, 0])).tolist() == [-1, 2]


def test_the_voronoi_rule_keeps_both_scopes_and_the_nearer_center_answers():
    """The same conflict as above under ``conflict_rule="voronoi"``: nothing shrinks or is forgotten; between
    the two edits the nearer center answers, and each edit keeps its full reach on its far side."""
    split, voronoi = fresh(), VectorDatabase(dim=2, init_radius=RADIUS, conflict_rule="voronoi")
    for db in (split, voronoi):
        db.insert(keys([0, 0]), [A], 0)
        db.insert(keys([1.0, 0]), [A], 1)
        counts = db.insert(keys([1.3, 0]), [B], 2)
        assert counts.conflicts == 1
    assert voronoi.radii.tolist() == [RADIUS, RADIUS] and voronoi.stats()["forgotten_points"] == 0 and len(voronoi) == 3
    #             far side of A   A's point 0   nearer B's center   far side of B   out of reach
    probe = keys([-0.4, 0], [0, 0], [0.95, 0], [2.2, 0], [2.4, 0])
    assert voronoi.search(probe).tolist() == [0, 0, 2, 2, -1]
    assert split.search(probe).tolist() == [-1, -1, 2, -1, -1]
    tensors, meta = voronoi.state_dict()
    assert VectorDatabase.from_state_dict(tensors, meta, device="cpu").conflict_rule == "voronoi"
    meta.pop("conflict_rule")  # a save from before the rule was recorded: made under MELO's split
    assert VectorDatabase.from_state_dict(tensors, meta, device="cpu").conflict_rule == "split"
    with pytest.raises(ValueError, match="conflict_rule must be one of"):
        VectorDatabase(dim=2, init_radius=RADIUS, conflict_rule="merge")


def test_nearest_clusters_are_computed_once_per_batch():
    db = fresh()
    db.insert(keys([0, 0]), [A], 0)
    # Both keys are far from the only old cluster; the second is close to the first but new
    # clusters of the same batch are not candidates, so each key becomes its own cluster.
    counts = db.insert(keys([5, 0], [5.1, 0]), [A, A], 1)
    assert counts.new_clusters == 2 and db.num_clusters == 3


def test_labels_are_compared_exactly_not_by_sum():
    db = fresh()
    db.insert(keys([0, 0]), [(1, 2)], 0)
    counts = db.insert(keys([0.5, 0]), [(2, 1)], 1)  # same token sum, different label
    assert counts.conflicts == 1


def test_failed_insert_changes_nothing():
    db = fresh()
    db.insert(keys([0, 0]), [A], 0)
    before = {name: t.clone() for name, t in db.state_dict()[0].items()}
    with pytest.raises(ValueError):
        db.insert(keys([1, 0], [2, 0]), [A], 1)  # two keys, one label
    with pytest.raises(ValueError):
        db.insert(torch.zeros(1, 3), [A], 1)  # wrong dim
    after = db.state_dict()[0]
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_state_round_trip():
    db = fresh()
    db.insert(keys([0, 0], [3, 3]), [A, B], 0)
    db.insert(keys([0.5, 0]), [B], 1)
    tensors, meta = db.state_dict()
    copy = VectorDatabase.from_state_dict(tensors, meta, device="cpu")
    probe = keys([0.1, 0], [3, 3.1], [0.45, 0], [9, 9])
    assert copy.search(probe).tolist() == db.search(probe).tolist()
    assert copy.stats() == db.stats() and copy.labels == db.labels
