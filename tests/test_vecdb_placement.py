"""The insert's named steps (``melo_fast.vecdb.insert.Placement``) on hand-made 2-D keys."""

import pytest
import torch

from melo_fast.vecdb import VectorDatabase, insert
from melo_fast.vecdb.insert import Placement

RED, BLUE = 7, 8  # label ids


def keys(*points):
    return torch.tensor(points, dtype=torch.float32)


def stored():
    """Two clusters: a red one of two points around (0, 0) and a blue one at (10, 0)."""
    db = VectorDatabase(dim=2, init_radius=1.0)
    db.insert(keys([0, 0]), [(RED,)], 0)
    db.insert(keys([0.5, 0]), [(RED,)], 1)  # merges: center (0.25, 0)
    db.insert(keys([10, 0]), [(BLUE,)], 2)
    return db


def placement(db, batch, labels, block_id=3):
    ids, new = db._label_ids([(label,) for label in labels])
    assert not new
    return Placement(db, batch, ids, block_id, [db.init_radius] * batch.shape[0], db._scan_geometry(), (None, None))


def test_each_step_records_what_it_found():
    db = stored()
    before = {name: t.clone() for name, t in db.state_dict()[0].items()}
    # Key 0 (blue) re-edits the red point at (0.5, 0), then conflicts with the rest of the red cluster;
    # key 1 merges into the blue cluster; key 2 is far from everything.
    steps = placement(db, keys([0.5, 0.05], [10.4, 0], [50, 50]), [BLUE, BLUE, RED])
    found = steps.scan(steps.clash())
    # Stored points are measured only where one may coincide with a key (the re-edit rule's question).
    assert found["point"] == [1.0, -1.0, -1.0] and [c for c, _ in steps.nearest] == [0, 1, 1]
    steps.supersede(found)
    assert steps.counts.superseded == 1 and list(steps.touched) == [0] and steps.touched[0].sources == [0]
    steps.fetch_reached()
    assert sorted(steps.touched) == [0, 1]  # key 1 reaches the blue cluster
    steps.apply_rules()
    assert (steps.counts.merged, steps.counts.new_clusters, steps.counts.conflicts) == (1, 1, 1)
    placed = steps.rebuild()
    assert placed.points.shape == (5, 2) and placed.point_blocks.tolist() == [0, 2, 3, 3, 3]
    # The database itself was only read.
    assert all(torch.equal(before[name], t) for name, t in db.state_dict()[0].items())


def test_a_cluster_whose_every_point_is_superseded_is_removed():
    db = stored()
    steps = placement(db, keys([10, 0]), [RED])
    steps.supersede(steps.scan(None))
    assert list(steps.dead) == [1] and not steps.touched
    placed = steps.rebuild()
    assert placed.centers.shape == (1, 2)  # only the red cluster is left (the new one comes from apply_rules)


def test_the_clash_check_runs_once_when_the_caller_has_refused_clashes(monkeypatch):
    db = stored()
    scans = []
    real = insert.coincident_pairs
    monkeypatch.setattr(insert, "coincident_pairs", lambda *args: scans.append(1) or real(*args))
    db.copy().insert(keys([3, 3], [4, 4]), [(RED,), (BLUE,)], 3)
    assert len(scans) == 1
    db.copy().insert(keys([3, 3], [4, 4]), [(RED,), (BLUE,)], 3, refuse_clashes=False)
    assert len(scans) == 1
    with pytest.raises(ValueError, match=r"rows \[\(0, 1\)\] of the batch are the same input"):
        db.copy().insert(keys([3, 3], [3, 3]), [(RED,), (BLUE,)], 3)
