"""``VectorDatabase.insert`` against the plain oracle ``melo_fast/vecdb/naive.py``, over thousands of keys.

The edit stream is drawn so that every rule fires many times: inputs sit close enough together that
edits of the same fact merge and edits of different facts conflict at a real distance (shrinking
merged clusters, forgetting points, emptying clusters), facts are corrected later (re-edits, on the
stored key exactly or within the tolerance), some keys repeat exactly, and some batches ask two
answers for one input (refused by both, changing nothing). After every batch the database must hold
exactly what the oracle holds, bit for bit; every 25 batches and at the end, probes (stored keys,
the inputs, and points around them) must route identically with the default and the torch backends.
"""

from __future__ import annotations

import random

import pytest
import torch

from melo_fast import ops
from melo_fast.vecdb import VectorDatabase
from melo_fast.vecdb.naive import COINCIDE_FRACTION, OracleDatabase

DIM = 8
RADIUS = 1.0
INPUTS = 500
BATCHES = 300
LABELS = [(1,), (2,), (3,), (1, 2), (2, 1)]  # (1, 2) and (2, 1): same token sum, different labels
# Routes are compared with the torch backend, whose distances are the rules' (float32 vector_norm), and at
# the end with the reference on a sample. The default CPU backend (cpp) measures distances more precisely
# and so disagrees on points lying exactly on a radius: see test_cpp_search_on_a_merged_clusters_edge.
BACKENDS = ("torch",)


class EditStream:
    """Draws edit batches ``(keys [n, DIM], labels)`` over a fixed set of inputs whose facts change."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed)
        # About one other input within radius + init_radius of each one: merges and conflicts are common.
        self.inputs = torch.randn(INPUTS, DIM, generator=generator) * 1.6
        self.noise = torch.randn(100_000, DIM, generator=generator)
        self.used = 0
        self.fact = [self.rng.choice(LABELS) for _ in range(INPUTS)]
        self.stored: list[tuple[int, torch.Tensor]] = []  # (input, key) of every key sent so far

    def _noise(self, length: float) -> torch.Tensor:
        vector = self.noise[self.used % len(self.noise)]
        self.used += 1
        return vector / vector.norm() * length

    def row(self) -> tuple[int, torch.Tensor, tuple]:
        kind = self.rng.random()
        if kind < 0.15 and self.stored:  # a correction of a stored edit: the same input, a new fact
            source, key = self.rng.choice(self.stored)
            self.fact[source] = self.rng.choice([label for label in LABELS if label != self.fact[source]])
            if self.rng.random() < 0.5:
                key = key + self._noise(0.5 * COINCIDE_FRACTION * RADIUS)
            return source, key, self.fact[source]
        if kind < 0.25 and self.stored:  # the very same key again, same fact (a merge at distance 0)
            source, key = self.rng.choice(self.stored)
            return source, key.clone(), self.fact[source]
        if kind < 0.30:  # far from everything
            return -1, torch.randn(DIM) * 30, self.rng.choice(LABELS)
        source = self.rng.randrange(INPUTS)
        if self.rng.random() < 0.2:  # the fact changes, from a paraphrase: a conflict at a real distance
            self.fact[source] = self.rng.choice(LABELS)
        return source, self.inputs[source] + self._noise(self.rng.uniform(0.15, 0.6)), self.fact[source]

    def batch(self) -> tuple[torch.Tensor, list[tuple], bool]:
        """A batch, and whether it deliberately asks two answers for one input."""
        rows, sources, size = [], set(), self.rng.randint(1, 16)
        while len(rows) < size:
            source, key, label = self.row()
            if source >= 0 and source in sources:
                continue  # one input per batch (an input's fact may have changed within the batch)
            sources.add(source)
            rows.append((source, key, label))
        clash = len(rows) > 1 and self.rng.random() < 0.02
        if clash:
            source, key, label = rows[0]
            rows.append((source, key.clone(), next(other for other in LABELS if other != label)))
        else:
            self.stored += [(source, key) for source, key, _ in rows if source >= 0]
        return torch.stack([key for _, key, _ in rows]), [label for _, _, label in rows], clash

    def probes(self, count: int) -> torch.Tensor:
        picks = [self.rng.choice(self.stored)[1] for _ in range(count // 2)]
        around = [
            self.inputs[self.rng.randrange(INPUTS)] + self._noise(self.rng.uniform(0, 2)) for _ in range(count // 2)
        ]
        return torch.stack(picks + around)


def assert_same_contents(db: VectorDatabase, oracle: OracleDatabase, batch: int) -> None:
    clusters = oracle.clusters
    expected = {
        "centers": torch.stack([c.center for c in clusters]) if clusters else db.centers[:0],
        "radii": [c.radius for c in clusters],
        "labels": [c.label for c in clusters],
        "sizes": [len(c.points) for c in clusters],
        "points": torch.stack([key for c in clusters for key in c.keys()]) if len(db) else db.points[:0],
        "blocks": [block for c in clusters for _, block in c.points],
    }
    actual = {
        "centers": db.centers,
        "radii": db.radii.tolist(),
        "labels": [db.labels[i] for i in db.cluster_labels.tolist()],
        "sizes": (db.point_offsets[1:] - db.point_offsets[:-1]).tolist(),
        "points": db.points,
        "blocks": db.point_blocks.tolist(),
    }
    for name, value in expected.items():
        same = torch.equal(actual[name], value) if name in ("centers", "points") else actual[name] == value
        assert same, f"batch {batch}: {name} differ ({len(actual[name])} vs {len(value)} rows)"
    assert db.labels == oracle.labels
    assert (db.conflicts, db.forgotten, db.superseded) == (oracle.conflicts, oracle.forgotten, oracle.superseded)


def assert_same_routes(db, oracle, probes: torch.Tensor, batch: int, backends=BACKENDS) -> None:
    expected = oracle.search(probes)
    for backend in backends:
        actual = db.search(probes, backend=backend).tolist()
        wrong = [i for i, (a, e) in enumerate(zip(actual, expected, strict=True)) if a != e]
        shown = [(i, actual[i], expected[i]) for i in wrong[:10]]
        assert not wrong, f"batch {batch}, backend {backend}: (probe, block, oracle's block) {shown}"


@pytest.fixture
def one_thread():
    """One intra-op thread: the test makes ~10^5 tiny tensor ops, and on a shared machine waking a
    thread pool for each costs milliseconds (the results are the same: rows are reduced one by one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed, per_key_radii, conflict_rule",
                         [(0, False, "split"), (1, True, "split"), (2, True, "voronoi")])
def test_insert_matches_the_plain_rules_over_thousands_of_keys(seed, per_key_radii, conflict_rule, one_thread):
    """``per_key_radii``: every key brings its own radius (``insert(..., radii=...)``, an edit given in
    several wordings), drawn around ``RADIUS``; the rules read it wherever MELO's read ``init_radius``.
    ``conflict_rule``: MELO's split, or the voronoi rule (a conflict leaves the old cluster as it was)."""
    stream = EditStream(seed)
    draw = random.Random(seed)
    db = VectorDatabase(DIM, RADIUS, conflict_rule=conflict_rule)
    oracle = OracleDatabase(RADIUS, conflict_rule=conflict_rule)
    totals = dict.fromkeys(("new_clusters", "merged", "conflicts", "forgotten", "superseded"), 0)
    refused = inserted = 0
    for batch in range(BATCHES):
        keys, labels, clash = stream.batch()
        if clash:
            before = db.state_dict()[0]
            with pytest.raises(ValueError):
                oracle.insert(keys, labels, batch)
            with pytest.raises(ValueError, match="same input with different targets"):
                db.insert(keys, labels, batch)
            assert all(before[name] is tensor for name, tensor in db.state_dict()[0].items())
            refused += 1
            continue
        radii = [draw.choice((0.5, 1.0, 1.5)) * RADIUS for _ in labels] if per_key_radii else None
        expected = oracle.insert(keys, labels, batch, radii)
        published, frozen = db.copy(), {name: t.clone() for name, t in db.state_dict()[0].items()}
        db = db.copy()  # as the editor does: insert into a copy, never into the published database
        counts = db.insert(keys, labels, batch, radii=radii)
        assert all(torch.equal(t, frozen[name]) for name, t in published.state_dict()[0].items()), f"batch {batch}"
        inserted += len(keys)
        assert vars(counts) == expected, f"batch {batch}"
        for name in totals:
            totals[name] += expected[name]
        assert_same_contents(db, oracle, batch)
        if batch % 25 == 0:
            assert_same_routes(db, oracle, stream.probes(200), batch)
    everything = torch.cat([torch.stack([key for _, key in stream.stored]), stream.inputs, stream.probes(1000)])
    assert_same_routes(db, oracle, everything, BATCHES)
    assert_same_routes(db, oracle, everything[:: len(everything) // 150], BATCHES, backends=("reference",))
    # The stream exercised every rule, many times over (else the comparison above proves little).
    assert inserted > 2000 and refused >= 2
    emptied = sum(1 for cluster in oracle.clusters if not cluster.points)
    if conflict_rule == "voronoi":  # a conflict never touches the stored cluster: nothing is forgotten
        assert totals.pop("forgotten") == 0 and emptied == 0, (totals, emptied)
    else:
        assert emptied >= 10, emptied
    assert min(totals.values()) >= 100, totals


# Three keys of one fact, merged into one cluster (init_radius 0.3): its farthest point lies on the spread.
# With a radius equal to the spread, the cpp backend (a double-precision sum) found that point one
# float32 step outside and the edited key lost its edit; found by this test's stream in about 4% of
# merged 3-point clusters. The radius is now widened by the norm's rounding bound (covering_radius).
EDGE_KEYS = [
    [-0.20501580834388733, 0.9502546787261963, -1.1786506175994873, -0.8534078598022461,
     -1.289574146270752, -1.0061941146850586, 0.4062601923942566, -0.36226019263267517],
    [-0.19874697923660278, 0.7417914867401123, -1.3900038003921509, -0.7958226203918457,
     -1.455643653869629, -0.7104619741439819, 0.6971484422683716, -0.28398069739341736],
    [0.0798126608133316, 0.943157434463501, -1.0551093816757202, -0.6386710405349731,
     -1.3661364316940308, -0.9367521405220032, 0.7249464988708496, -0.6044405698776245],
]


def test_every_backend_routes_a_merged_clusters_farthest_point_home():
    db, oracle = VectorDatabase(DIM, 0.3), OracleDatabase(0.3)
    for block, key in enumerate(EDGE_KEYS):
        db.insert(torch.tensor([key]), [(1,)], block)
        oracle.insert(torch.tensor([key]), [(1,)], block)
    assert db.num_clusters == 1 and db.radii[0].item() > 0.3  # merged; the radius is the (widened) spread
    keys = torch.tensor(EDGE_KEYS)
    assert oracle.search(keys) == [0, 1, 2]
    available = [name for name, status in ops.backend_status().items() if status == "available"]
    for backend in available:
        assert db.search(keys, backend=backend).tolist() == [0, 1, 2], backend


def test_copies_that_insert_never_change_each_other():
    """Appending rows goes past every view handed out; a second copy of one database must not write there."""
    g = torch.Generator().manual_seed(3)
    base, oracle = VectorDatabase(DIM, RADIUS), OracleDatabase(RADIUS)
    first = torch.randn(50, DIM, generator=g) * 30
    base.insert(first, [(1,)] * 50, 0)
    oracle.insert(first, [(1,)] * 50, 0)
    snapshot = {name: t.clone() for name, t in base.state_dict()[0].items()}
    far = [torch.randn(5, DIM, generator=g) * 30 for _ in range(3)]
    a, b = base.copy(), base.copy()
    a.insert(far[0], [(2,)] * 5, 1)  # appends in place of base's spare rows
    a_snapshot = {name: t.clone() for name, t in a.state_dict()[0].items()}
    b.insert(far[1], [(3,)] * 5, 2)  # a's rows sit where b would append: b must get its own buffer
    base.insert(far[2], [(4,)] * 5, 3)  # base itself is no longer the last writer either
    assert all(torch.equal(t, a_snapshot[name]) for name, t in a.state_dict()[0].items())
    assert torch.equal(b.centers[50:], far[1]) and torch.equal(base.points[50:], far[2])
    assert torch.equal(b.centers[:50], snapshot["centers"]) and torch.equal(base.centers[:50], snapshot["centers"])
    for db, keys, label, block in ((a, far[0], (2,), 1), (b, far[1], (3,), 2), (base, far[2], (4,), 3)):
        twin = OracleDatabase(RADIUS)
        twin.insert(first, [(1,)] * 50, 0)
        twin.insert(keys, [label] * 5, block)
        assert_same_contents(db, twin, block)
