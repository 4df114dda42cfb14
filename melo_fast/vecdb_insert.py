"""Placing one edit batch into a :class:`~melo_fast.vecdb.VectorDatabase`, at a cost that does not grow with
the stored keys beyond one scan and one copy.

The rules are those of ``VectorDatabase.insert`` (DESIGN §1 and §2.10). This module applies them so that
Python only ever loops over the batch and over the clusters the batch changes ("touched"):

1. **Scan** (device): one pass over the centers (:func:`melo_fast.vecdb_scan.scan`) gives every key its
   exact nearest cluster and the clusters that may hold a stored point coinciding with it (those
   within ``tolerance + reach`` of the key, ``reach`` being a cluster's largest point distance from its
   center, kept beside the database). The points of those few clusters are measured exactly: the
   nearest stored point of each key, as the re-edit rule needs it.
2. **Re-edits** (host): the per-key results come back in one transfer; superseded points are
   removed from their clusters, whose points come back in one more transfer and are re-centred.
   Keys whose nearest cluster was one of those are scanned again without them (the rule computes
   nearest clusters after this step); re-centred clusters are compared with every key directly.
3. **MELO's rules** (host), key by key, on the clusters the batch touches only. Which ones those are
   is known before the loop (a cluster is touched exactly when some key's nearest cluster is it and
   that key is within its radius + ``init_radius``), so their points come back in one transfer.
4. **Rebuild** (device): new clusters are appended to the centers and points past every view handed
   out (:class:`~melo_fast.row_buffer.RowBuffer`: no copy); the small per-cluster and per-point
   tensors, and centers or points when a row or segment in the middle changes, are concatenated
   afresh from the untouched runs of the old ones and the new rows (a memory copy, no Python work
   per stored key). No tensor a database holds is ever written (the immutability contract).

The arithmetic of the rules (means, spreads, radii as Python floats until the batch is stored) is
the same expressions on the same rows as a plain loop over clusters, so the result is the same to
the last bit (checked against ``tests/vecdb_oracle.py``). On CUDA that arithmetic runs on the
host copies of the touched clusters.

Host synchronizations per insert on CUDA (counted from the code; not measured, no GPU was at hand):
two per block of the scan (one block while keys x centers <= 2**25), two for the scan of the batch
against itself (coinciding keys), one for the number of stored points to measure, one for the
per-key results: 6 for a batch of 100 against up to 335k clusters.
One more to fetch the touched clusters when the batch touches any (merges, conflicts, re-edits); for
re-edits whose key was nearest to the re-edited cluster, a second scan of those keys (2 per block + 1).
An empty database: three. Uploads to the device are non-blocking. Never one per key.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from melo_fast.row_buffer import RowBuffer
from melo_fast.vecdb_scan import UNIT_ROUNDOFF, exact_distances, relative_error, scan, squared_norms

# MELO splits a conflicting cluster at half the distance, 1e-5 to each side (DESIGN §1).
SPLIT_MARGIN = 1e-5
# Two keys "coincide" (are the same input, up to numerical noise) within this fraction of init_radius.
# Why a fraction of the radius: routing already needs the radius to exceed the keys' numerical noise
# (or an edited input would miss its own edit) and to stay below the distance between distinct inputs
# (or it would capture them); a tenth of it sits well inside both bounds, at any key scale.
COINCIDE_FRACTION = 0.1



def covering_radius(spread: float, dim: int) -> float:
    """The radius of a cluster whose farthest point is ``spread`` away from its center: a little wider.

    Why wider: that point lies exactly on the edge, and the search backends round the same float32
    norm differently (torch's reduction order, the C++ double-precision sum, Triton's tiles), so on
    a radius equal to the spread about 4% of merged clusters lost their farthest point in the cpp
    backend: an edited input that no longer reached its own edit. The widening is twice the
    rounding bound of a ``dim``-term float32 norm (``gamma_(d+2)``: 4.6e-5 relative at d = 384),
    far below any distance the rules compare, and it makes "a stored point routes to its cluster"
    hold in every backend.
    """
    k = (dim + 2) * UNIT_ROUNDOFF
    return spread * (1.0 + 2.0 * k / (1.0 - k))

@dataclass
class InsertCounts:
    """How the keys of one edit batch were placed.

    ``superseded``: stored points of another label that a key of this batch coincided with and took
    over (re-edits: the later edit wins).
    """

    new_clusters: int = 0
    merged: int = 0
    conflicts: int = 0
    forgotten: int = 0
    superseded: int = 0


def coincident_pairs(keys: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``[N, N]`` bool: ``i < j`` and keys ``i`` and ``j`` are at most ``tolerance`` apart.

    Exact distances (the scan measures every pair that can be that close), not ``torch.cdist``: for
    more than 25 rows cdist goes through a plain matrix product, which puts identical keys of norm 10^4
    about 10 apart; nor the ``[N, N, d]`` differences (50 ms for 100 keys of width 4096 on a CPU).
    """
    keys = keys.float()
    n = keys.shape[0]
    found = scan(keys, keys, squared_norms(keys), within=torch.full((n,), tolerance, device=keys.device))
    close = torch.zeros(n, n, dtype=torch.bool, device=keys.device)
    close[found.pair_queries, found.pair_centers] = found.pair_within
    return close.triu(diagonal=1)


def coinciding_conflicts(keys: torch.Tensor, labels: list[tuple[int, ...]], tolerance: float) -> list[tuple[int, int]]:
    """Pairs of rows ``(i, j)`` of one batch whose keys coincide but whose labels differ.

    Such a batch asks for two different answers to the same input; no block can hold both.
    """
    if keys.shape[0] < 2:
        return []
    close = coincident_pairs(keys, tolerance).nonzero().tolist()
    return [(i, j) for i, j in close if tuple(labels[i]) != tuple(labels[j])]


@dataclass
class Segment:
    """What the per-key transfer says about one old cluster."""

    radius: float
    label: int
    first: int  # its points are the old points [first, end)
    end: int


@dataclass
class TouchedCluster:
    """An old cluster the batch changes, held on the host while the batch is placed."""

    index: int
    segment: Segment
    radius: float
    center: torch.Tensor  # [d] float32
    vectors: torch.Tensor  # [m, d] float32: its points, the old ones first, then the keys merged into it
    sources: list[int] = field(default_factory=list)  # per row: old point index, or -1 - i for key i
    moved: bool = False  # the center was recomputed

    def recenter(self) -> float:
        """Center = mean of the points; returns the spread (largest point distance from it)."""
        self.center = self.vectors.mean(0)
        self.moved = True
        return torch.linalg.vector_norm(self.vectors - self.center, dim=1).max().item()

    def points_changed(self) -> bool:
        return self.sources != list(range(self.segment.first, self.segment.end))

    def reach(self) -> float:
        if not self.sources:
            return -math.inf
        return torch.linalg.vector_norm(self.vectors - self.center, dim=1).max().item()


@dataclass
class Placed:
    """The new tensors of the database (and its scan geometry) after one batch, plus the counts."""

    centers: torch.Tensor
    center_rows: RowBuffer
    radii: torch.Tensor
    cluster_labels: torch.Tensor
    point_offsets: torch.Tensor
    points: torch.Tensor
    point_rows: RowBuffer
    point_blocks: torch.Tensor
    center_sq_norms: torch.Tensor
    reach: torch.Tensor
    counts: InsertCounts


def _upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list or tensor on ``device``, without waiting for the device (H2D copies are staged)."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return host.to(device=device, dtype=dtype, non_blocking=True)


def _segment_facts(db, clusters: torch.Tensor) -> torch.Tensor:
    """``[m, 4]`` float64 (radius, label, first point, end point) of clusters (-1 gives zeros)."""
    safe = clusters.clamp(min=0)
    facts = torch.stack(
        [db.radii[safe].double(), db.cluster_labels[safe].double(),
         db.point_offsets[safe].double(), db.point_offsets[safe + 1].double()],
        dim=1,
    )
    return torch.where((clusters >= 0)[:, None], facts, 0.0)


def _segment(row: list[float]) -> Segment:
    return Segment(row[0], int(row[1]), int(row[2]), int(row[3]))


def _nearest_points(db, keys: torch.Tensor, found) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key, the nearest stored point of the clusters in reach (index, exact distance; -1, inf if none)."""
    n, total_points = keys.shape[0], len(db)
    first = db.point_offsets[found.pair_centers]
    sizes = torch.where(found.pair_within, db.point_offsets[found.pair_centers + 1] - first, 0)
    total = int(sizes.sum()) if sizes.numel() else 0  # host synchronization: how many to measure
    best = torch.full((n,), math.inf, device=keys.device)
    if total == 0:
        return torch.full((n,), -1, dtype=torch.int64, device=keys.device), best
    owner = torch.repeat_interleave(found.pair_queries, sizes, output_size=total)
    offset = torch.repeat_interleave(first - (torch.cumsum(sizes, 0) - sizes), sizes, output_size=total)
    point = torch.arange(total, device=keys.device) + offset
    distance = exact_distances(keys, owner, db.points, point)
    best = best.scatter_reduce(0, owner, distance, "amin")
    lowest = torch.full((n,), total_points, dtype=torch.int64, device=keys.device)
    lowest = lowest.scatter_reduce(0, owner, torch.where(distance == best[owner], point, total_points), "amin")
    return torch.where(lowest == total_points, -1, lowest), best


def _fetch(db, keys: torch.Tensor | None, segments: list[Segment], center_rows: list[int]):
    """One device-to-host transfer: the keys (if given), the points of ``segments``, and center rows."""
    parts = ([] if keys is None else [keys]) + [db.points[s.first : s.end] for s in segments]
    parts += [db.centers[c : c + 1] for c in center_rows]
    host = torch.cat(parts).cpu() if parts else torch.empty(0, db.dim)
    sizes = ([] if keys is None else [keys.shape[0]]) + [s.end - s.first for s in segments] + [1] * len(center_rows)
    pieces = list(host.split(sizes)) if sizes else []
    host_keys = pieces.pop(0) if keys is not None else None
    return host_keys, pieces[: len(segments)], pieces[len(segments) :]


def place(db, keys: torch.Tensor, key_labels: list[int], block_id: int) -> Placed:
    """Apply the insert rules to batch ``keys`` ``[N, d]`` float32 (on the database's device) with label
    ids ``key_labels``, all routing to ``block_id``. Reads ``db``, never writes it.

    Raises:
        ValueError: two keys of the batch coincide with different labels (checked before any change).
    """
    n, device = keys.shape[0], db.device
    tolerance, init_radius = db.coincide_tolerance, db.init_radius
    counts = InsertCounts()
    label_ids = _upload(key_labels, torch.int64, device)
    clash = (coincident_pairs(keys, tolerance) & (label_ids[:, None] != label_ids[None, :])).any()

    touched: dict[int, TouchedCluster] = {}
    dead: dict[int, Segment] = {}  # clusters whose every point was superseded: removed
    nearest: list[tuple[int, float]] = [(-1, math.inf)] * n  # per key, after the re-edits
    facts: dict[int, Segment] = {}
    host_keys = None
    if db.num_clusters == 0:
        _refuse_if(bool(clash), keys, key_labels, tolerance)  # a synchronization (the scan above made two)
    else:
        center_sq_norms, reach = db._scan_geometry()
        within = torch.where(reach >= 0, (tolerance + reach) * (1 + relative_error(db.dim)), -math.inf)
        found = scan(keys, db.centers, center_sq_norms, within=within)
        point, point_distance = _nearest_points(db, keys, found)
        point_cluster = torch.searchsorted(db.point_offsets[1:], point.clamp(min=0), right=True)
        per_key = torch.cat(
            [found.nearest.double()[:, None], found.distance.double()[:, None], _segment_facts(db, found.nearest),
             point.double()[:, None], point_distance.double()[:, None], point_cluster.double()[:, None],
             _segment_facts(db, torch.where(point >= 0, point_cluster, -1)), clash.double().expand(n)[:, None]],
            dim=1,
        ).tolist()  # host synchronization: everything the rules need per key
        _refuse_if(per_key[0][-1] > 0, keys, key_labels, tolerance)
        for i, row in enumerate(per_key):
            if row[0] >= 0:
                nearest[i] = (int(row[0]), row[1])
                facts[int(row[0])] = _segment(row[2:6])

        # 1. Re-edits: a key coinciding with a stored point of another label takes it over.
        superseded: set[int] = set()
        hit: dict[int, Segment] = {}
        for i, row in enumerate(per_key):
            p, distance, cluster, segment = int(row[6]), row[7], int(row[8]), _segment(row[9:13])
            if p >= 0 and distance <= tolerance and p not in superseded and segment.label != key_labels[i]:
                superseded.add(p)
                hit[cluster] = segment
        counts.superseded = len(superseded)
        if hit:
            order = sorted(hit)
            host_keys, pieces, _ = _fetch(db, keys, [hit[c] for c in order], [])
            for c, piece in zip(order, pieces, strict=True):
                segment = hit[c]
                sources = [p for p in range(segment.first, segment.end) if p not in superseded]
                if not sources:
                    dead[c] = segment
                    continue
                rows = torch.tensor([p - segment.first for p in sources], dtype=torch.int64)
                cluster = TouchedCluster(c, segment, segment.radius, piece[0], piece[rows], sources)
                spread = covering_radius(cluster.recenter(), db.dim)
                cluster.radius = min(segment.radius, max(spread, init_radius))  # never grows
                touched[c] = cluster
            _nearest_after_reedits(db, keys, host_keys, center_sq_norms, set(hit), touched, nearest, facts)

        # Clusters MELO's rules will touch: a key's nearest one, within its radius + init_radius.
        reached = sorted(
            {c for c, d in nearest if c >= 0 and c not in touched and not d > facts[c].radius + init_radius}
        )
        if reached:
            fetched_keys, pieces, center_rows = _fetch(db, keys if host_keys is None else None,
                                                       [facts[c] for c in reached], reached)
            host_keys = fetched_keys if host_keys is None else host_keys
            for c, piece, center in zip(reached, pieces, center_rows, strict=True):
                segment = facts[c]
                touched[c] = TouchedCluster(c, segment, segment.radius, center[0], piece,
                                            list(range(segment.first, segment.end)))

    # 2. MELO's rules, key by key, against the nearest clusters found above.
    new_clusters: list[tuple[int, float]] = []  # (key, radius), in the order they are made
    for i, (c, distance) in enumerate(nearest):
        cluster = touched.get(c)
        if c < 0 or distance > (cluster.radius if cluster else facts[c].radius) + init_radius:
            new_clusters.append((i, init_radius))
            counts.new_clusters += 1
        elif cluster.segment.label == key_labels[i]:
            cluster.vectors = torch.cat([cluster.vectors, host_keys[i : i + 1]])
            cluster.sources.append(-1 - i)
            cluster.radius = max(covering_radius(cluster.recenter(), db.dim), init_radius)
            counts.merged += 1
        else:
            new_clusters.append((i, distance / 2 + SPLIT_MARGIN))
            cluster.radius = distance / 2 - SPLIT_MARGIN
            if cluster.sources:
                spreads = torch.linalg.vector_norm(cluster.vectors - cluster.center, dim=1).tolist()
                far = [d > cluster.radius for d in spreads]
                if any(far):  # forgotten; an emptied cluster keeps its center and routes to "none"
                    kept = [k for k, gone in enumerate(far) if not gone]
                    cluster.vectors = cluster.vectors[torch.tensor(kept, dtype=torch.int64)]
                    cluster.sources = [cluster.sources[k] for k in kept]
                    counts.forgotten += len(far) - len(kept)
            counts.conflicts += 1
    return _rebuild(db, keys, key_labels, block_id, touched, dead, new_clusters, counts)


def _refuse_if(clash: bool, keys: torch.Tensor, key_labels: list[int], tolerance: float) -> None:
    if clash:
        pairs = coinciding_conflicts(keys, [(label,) for label in key_labels], tolerance)
        raise ValueError(f"VectorDatabase.insert: rows {pairs} of the batch are the same input with different targets")


def _nearest_after_reedits(db, keys, host_keys, center_sq_norms, hit: set[int], touched, nearest, facts) -> None:
    """Nearest clusters once superseded points are gone (in place in ``nearest``/``facts``).

    A key whose nearest cluster lost points is scanned again without the re-edited clusters; then
    every key is compared with the re-centred ones (ties to the lower index, as everywhere).
    """
    again = [i for i, (c, _) in enumerate(nearest) if c in hit]
    if again:
        excluded = torch.zeros(db.num_clusters, dtype=torch.bool)
        excluded[sorted(hit)] = True
        rows = _upload(again, torch.int64, db.device)
        found = scan(keys[rows], db.centers, center_sq_norms, excluded=_upload(excluded, torch.bool, db.device))
        per_key = torch.cat(
            [found.nearest.double()[:, None], found.distance.double()[:, None], _segment_facts(db, found.nearest)],
            dim=1,
        ).tolist()  # host synchronization (with the scan's)
        for i, row in zip(again, per_key, strict=True):
            nearest[i] = (int(row[0]), row[1]) if row[0] >= 0 else (-1, math.inf)
            if row[0] >= 0:
                facts[int(row[0])] = _segment(row[2:6])
    for c in sorted(touched):
        distances = torch.linalg.vector_norm(host_keys - touched[c].center, dim=1).tolist()
        for i, distance in enumerate(distances):
            best_c, best_d = nearest[i]
            if distance < best_d or (distance == best_d and c < best_c):
                nearest[i] = (c, distance)


def _rebuild(db, keys, key_labels, block_id, touched, dead, new_clusters, counts) -> Placed:
    """The database's tensors after the batch: untouched runs of the old ones, touched clusters' new
    rows and points, then the new clusters. ``db``'s tensors are never written: the small ones are
    concatenated afresh; centers and points get the new rows appended past every view
    (:class:`~melo_fast.row_buffer.RowBuffer`) unless a row or segment in the middle changes, and
    are then concatenated into a new buffer."""
    device, n_clusters, n_points = db.device, db.num_clusters, len(db)
    center_sq_norms, reach = db._scan_geometry() if n_clusters else (db.radii, db.radii)
    gone = sorted(dead)
    runs, start = [], 0
    for c in gone + [n_clusters]:
        if c > start:
            runs.append((start, c))
        start = c + 1
    order = sorted(touched)
    n_new = len(new_clusters)
    new_keys = keys[_upload([i for i, _ in new_clusters], torch.int64, device)]

    def per_cluster(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([old[a:b] for a, b in runs] + [new])

    radii = per_cluster(db.radii, _upload([r for _, r in new_clusters], torch.float32, device))
    new_labels = _upload([key_labels[i] for i, _ in new_clusters], torch.int64, device)
    cluster_labels = per_cluster(db.cluster_labels, new_labels)
    ones = torch.ones(n_new, dtype=torch.int64, device=device)
    sizes = per_cluster(db.point_offsets[1:] - db.point_offsets[:-1], ones)
    sq_norms = per_cluster(center_sq_norms, squared_norms(new_keys))
    reaches = per_cluster(reach, torch.zeros(n_new, device=device))  # a new cluster's point is its center
    if gone or any(touched[c].moved for c in order):
        center_rows, centers = RowBuffer.concatenated([db.centers[a:b] for a, b in runs] + [new_keys], db.centers)
    else:
        center_rows, centers = RowBuffer.appended(db._center_rows, db.centers, new_keys)
    if order:  # the rows written here are fresh: no view of them was handed out yet
        position = _upload([c - bisect.bisect_left(gone, c) for c in order], torch.int64, device)
        new_centers = _upload(torch.stack([touched[c].center for c in order]), torch.float32, device)
        if any(touched[c].moved for c in order):
            centers.index_copy_(0, position, new_centers)
            sq_norms.index_copy_(0, position, squared_norms(new_centers))
        radii.index_copy_(0, position, _upload([touched[c].radius for c in order], torch.float32, device))
        sizes.index_copy_(0, position, _upload([len(touched[c].sources) for c in order], torch.int64, device))
        reaches.index_copy_(0, position, _upload([touched[c].reach() for c in order], torch.float32, device))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(sizes, 0)])

    changed = sorted(set(gone) | {c for c in order if touched[c].points_changed()})
    if not changed:
        point_rows, points = RowBuffer.appended(db._point_rows, db.points, new_keys)
        point_blocks = torch.cat([db.point_blocks, ones * block_id])
        return Placed(centers, center_rows, radii, cluster_labels, offsets, points, point_rows, point_blocks,
                      sq_norms, reaches, counts)
    sources = _upload([s for c in changed if c in touched for s in touched[c].sources], torch.int64, device)
    old_blocks = db.point_blocks[sources.clamp(min=0)] if n_points else torch.zeros_like(sources)
    member_blocks = torch.where(sources >= 0, old_blocks, block_id)
    members = [db.points.new_empty(0, db.dim).cpu()] + [touched[c].vectors for c in changed if c in touched]
    member_vectors = _upload(torch.cat(members), torch.float32, device)
    point_pieces, block_pieces, previous, member = [], [], 0, 0
    for c in changed:
        segment = touched[c].segment if c in touched else dead[c]
        point_pieces.append(db.points[previous : segment.first])
        block_pieces.append(db.point_blocks[previous : segment.first])
        if c in touched:
            size = len(touched[c].sources)
            point_pieces.append(member_vectors[member : member + size])
            block_pieces.append(member_blocks[member : member + size])
            member += size
        previous = segment.end
    point_pieces += [db.points[previous:n_points], new_keys]
    block_pieces += [db.point_blocks[previous:n_points], ones * block_id]
    point_rows, points = RowBuffer.concatenated(point_pieces, db.points)
    return Placed(centers, center_rows, radii, cluster_labels, offsets, points, point_rows, torch.cat(block_pieces),
                  sq_norms, reaches, counts)
