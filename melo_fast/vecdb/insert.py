"""Placing one edit batch into a :class:`~melo_fast.vecdb.VectorDatabase`, at a cost that does not grow with
the stored keys beyond one scan and one copy.

The rules are those of ``VectorDatabase.insert`` (DESIGN §1 and §2.10). A :class:`Placement` applies them
as named steps, so that Python only ever loops over the batch and over the clusters the batch changes
("touched"):

0. **Clashes** (:meth:`~Placement.clash`): two keys of the batch that coincide with different labels
   refuse the batch before anything changes (skipped when the caller has refused them already).
1. **Scan** (device; :meth:`~Placement.scan`): one pass over the centers (:func:`melo_fast.vecdb.scan.scan`)
   gives every key its exact nearest cluster and the clusters that may hold a stored point coinciding
   with it (those within ``tolerance + reach`` of the key, ``reach`` being a cluster's largest point
   distance from its center, kept beside the database). The points of those few clusters are measured
   exactly: the nearest stored point of each key, as the re-edit rule needs it.
2. **Re-edits** (host; :meth:`~Placement.supersede`): the per-key results come back in one transfer;
   superseded points are removed from their clusters, whose points come back in one more transfer and
   are re-centred. Keys whose nearest cluster was one of those are scanned again without them (the rule
   computes nearest clusters after this step); re-centred clusters are compared with every key directly.
3. **MELO's rules** (host; :meth:`~Placement.fetch_reached`, :meth:`~Placement.apply_rules`), key by key,
   on the clusters the batch touches only. Which ones those are is known before the loop (a cluster is
   touched exactly when some key's nearest cluster is it and that key is within its radius + the key's
   radius, ``init_radius`` unless the caller gave per-key radii), so their points come back in one transfer.
   A conflict follows the database's ``conflict_rule``: MELO's split, or voronoi (the key's own cluster,
   the old one unchanged).
4. **Rebuild** (device; :meth:`~Placement.rebuild`): new clusters are appended to the centers and points
   past every view handed out (:class:`~melo_fast.vecdb.rows.RowBuffer`: no copy); the small per-cluster
   and per-point tensors, and centers or points when a row or segment in the middle changes, are
   concatenated afresh from the untouched runs of the old ones and the new rows (a memory copy, no
   Python work per stored key). No tensor a database holds is ever written (the immutability contract).

The arithmetic of the rules (means, spreads, radii as Python floats until the batch is stored) is
the same expressions on the same rows as a plain loop over clusters, so the result is the same to
the last bit (checked against ``naive.py``). On CUDA that arithmetic runs on the host copies of the
touched clusters.

Host synchronizations per insert on CUDA (counted from the code): two per block of the scan (one
block while keys x centers <= 2**25), two for the scan of the batch against itself (coinciding keys;
none when the caller refused clashes), one for the number of stored points to measure, one for the
per-key results: 6 for a batch of 100 against up to 335k clusters. One more to fetch the touched
clusters when the batch touches any (merges, conflicts, re-edits); for re-edits whose key was nearest
to the re-edited cluster, a second scan of those keys (2 per block + 1). An empty database: three.
Uploads to the device are non-blocking. Never one per key.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from melo_fast.vecdb.rows import RowBuffer
from melo_fast.vecdb.scan import UNIT_ROUNDOFF, exact_distances, relative_error, scan, squared_norms

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
    about 10 apart; nor the ``[N, N, d]`` differences (a temporary of N² key widths).
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


def _to_host(columns: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Named ``[n]`` device columns as host lists of float64 values, in one device-to-host transfer."""
    rows = torch.stack([column.double() for column in columns.values()]).tolist()
    return dict(zip(columns, rows, strict=True))


def _segment_at(host: dict[str, list[float]], prefix: str, i: int) -> Segment:
    """Row ``i`` of the columns :meth:`Placement._segment_columns` named with ``prefix``."""
    return Segment(host[prefix + "radius"][i], int(host[prefix + "label"][i]), int(host[prefix + "first"][i]),
                   int(host[prefix + "end"][i]))


class Placement:
    """One batch of keys being placed into a database: the steps of the insert, and what they found.

    Reads the database, never writes it: :meth:`run` returns the database's new tensors.

    Args:
        db: the database (its tensors, ``init_radius`` and ``coincide_tolerance``).
        keys: ``[N, d]`` float32 keys on the database's device.
        key_labels: ``N`` label ids (indices into the database's labels, new ones included).
        block_id: the block every key routes to.
        radii: per key, the radius it reaches with and gives a cluster it creates or joins (the database's
            ``init_radius`` for every key unless the caller gives others; MELO's rules with ``init_radius``
            read as the key's own radius).
        geometry: ``(||center||² [C], reach [C])`` of the database's tensors (its scan geometry).
        buffers: the database's room to append centers and points (:class:`RowBuffer` or None each).

    Attributes filled by the steps:
        nearest: per key, its nearest cluster and the exact distance (-1, inf: none), after the re-edits.
        segments: what the transfers said about each old cluster seen (radius, label, its points' range).
        touched: the old clusters the batch changes, held on the host.
        dead: old clusters whose every point was superseded (they are removed).
        new_clusters: ``(key, radius)`` of each cluster the batch makes, in order.
        counts: how the keys were placed.
    """

    def __init__(self, db, keys: torch.Tensor, key_labels: list[int], block_id: int, radii: list[float], geometry,
                 buffers):
        self.db, self.keys, self.labels, self.block_id, self.radii = db, keys, key_labels, block_id, radii
        self.center_sq_norms, self.reach = geometry
        self.center_rows, self.point_rows = buffers
        self.tolerance, self.init_radius = db.coincide_tolerance, db.init_radius
        self.nearest: list[tuple[int, float]] = [(-1, math.inf)] * keys.shape[0]
        self.segments: dict[int, Segment] = {}
        self.touched: dict[int, TouchedCluster] = {}
        self.dead: dict[int, Segment] = {}
        self.new_clusters: list[tuple[int, float]] = []
        self.counts = InsertCounts()
        self.host_keys: torch.Tensor | None = None  # [N, d] on the host, once a step needed them

    def run(self, refuse_clashes: bool = True) -> Placed:
        """Every step in order. ``refuse_clashes=False``: the caller has refused coinciding keys with
        different labels already (with :func:`coinciding_conflicts` at this database's tolerance)."""
        clash = self.clash() if refuse_clashes else None
        if self.db.num_clusters == 0:
            if clash is not None:
                self.refuse_if(bool(clash))  # a synchronization (the scan in clash() made two)
        else:
            found = self.scan(clash)
            self.supersede(found)
            self.fetch_reached()
        self.apply_rules()
        return self.rebuild()

    # --- 0. clashes -----------------------------------------------------------------------------------
    def clash(self) -> torch.Tensor:
        """0-dim bool on the device, not read yet: two keys of the batch coincide with different labels."""
        label_ids = _upload(self.labels, torch.int64, self.db.device)
        return (coincident_pairs(self.keys, self.tolerance) & (label_ids[:, None] != label_ids[None, :])).any()

    def refuse_if(self, clash: bool) -> None:
        if clash:
            pairs = coinciding_conflicts(self.keys, [(label,) for label in self.labels], self.tolerance)
            raise ValueError(
                f"VectorDatabase.insert: rows {pairs} of the batch are the same input with different targets"
            )

    # --- 1. scan --------------------------------------------------------------------------------------
    def scan(self, clash: torch.Tensor | None) -> dict[str, list[float]]:
        """Nearest clusters and nearest stored points of every key, computed on the device and brought
        back in one transfer (returned by name); refuses a clash; fills :attr:`nearest`."""
        db, keys = self.db, self.keys
        within = torch.where(self.reach >= 0, (self.tolerance + self.reach) * (1 + relative_error(db.dim)), -math.inf)
        found = scan(keys, db.centers, self.center_sq_norms, within=within)
        point, point_distance = self._nearest_points(found)
        point_cluster = torch.searchsorted(db.point_offsets[1:], point.clamp(min=0), right=True)
        columns = {
            "nearest": found.nearest,
            "distance": found.distance,
            **self._segment_columns(found.nearest, "nearest_"),
            "point": point,
            "point_distance": point_distance,
            "point_cluster": point_cluster,
            **self._segment_columns(torch.where(point >= 0, point_cluster, -1), "point_"),
        }
        if clash is not None:
            columns["clash"] = clash.expand(keys.shape[0])
        found_here = _to_host(columns)  # host synchronization: everything the rules need per key
        if clash is not None:
            self.refuse_if(found_here["clash"][0] > 0)
        for i, cluster in enumerate(found_here["nearest"]):
            if cluster >= 0:
                self.nearest[i] = (int(cluster), found_here["distance"][i])
                self.segments[int(cluster)] = _segment_at(found_here, "nearest_", i)
        return found_here

    def _segment_columns(self, clusters: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        """Radius, label, first and end point of each cluster index in ``clusters`` (-1 gives zeros)."""
        db = self.db
        safe = clusters.clamp(min=0)
        columns = {
            "radius": db.radii[safe],
            "label": db.cluster_labels[safe],
            "first": db.point_offsets[safe],
            "end": db.point_offsets[safe + 1],
        }
        return {prefix + name: torch.where(clusters >= 0, column.double(), 0.0) for name, column in columns.items()}

    def _nearest_points(self, found) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key, the nearest stored point of the clusters in reach (index, exact distance; -1, inf if none)."""
        db, keys = self.db, self.keys
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

    # --- 2. re-edits ------------------------------------------------------------------------------------
    def supersede(self, found: dict[str, list[float]]) -> None:
        """A key coinciding with a stored point of another label takes it over: the point leaves its
        cluster, which is re-centred (its radius never grows) or, left empty, removed; then the keys'
        nearest clusters are those without the superseded points."""
        superseded: set[int] = set()
        hit: dict[int, Segment] = {}
        for i, label in enumerate(self.labels):
            p, distance, segment = int(found["point"][i]), found["point_distance"][i], _segment_at(found, "point_", i)
            if p >= 0 and distance <= self.tolerance and p not in superseded and segment.label != label:
                superseded.add(p)
                hit[int(found["point_cluster"][i])] = segment
        self.counts.superseded = len(superseded)
        if not hit:
            return
        order = sorted(hit)
        self.host_keys, pieces, _ = self._fetch(self.keys, [hit[c] for c in order], [])
        for c, piece in zip(order, pieces, strict=True):
            segment = hit[c]
            sources = [p for p in range(segment.first, segment.end) if p not in superseded]
            if not sources:
                self.dead[c] = segment
                continue
            rows = torch.tensor([p - segment.first for p in sources], dtype=torch.int64)
            cluster = TouchedCluster(c, segment, segment.radius, piece[0], piece[rows], sources)
            spread = covering_radius(cluster.recenter(), self.db.dim)
            cluster.radius = min(segment.radius, max(spread, self.init_radius))  # never grows
            self.touched[c] = cluster
        self._nearest_without(set(hit))

    def _nearest_without(self, hit: set[int]) -> None:
        """Nearest clusters once superseded points are gone: a key whose nearest cluster lost points is
        scanned again without the re-edited clusters; then every key is compared with the re-centred
        ones (ties to the lower index, as everywhere)."""
        db = self.db
        again = [i for i, (c, _) in enumerate(self.nearest) if c in hit]
        if again:
            excluded = torch.zeros(db.num_clusters, dtype=torch.bool)
            excluded[sorted(hit)] = True
            rows = _upload(again, torch.int64, db.device)
            found = scan(self.keys[rows], db.centers, self.center_sq_norms,
                         excluded=_upload(excluded, torch.bool, db.device))
            rescanned = _to_host(
                {"nearest": found.nearest, "distance": found.distance, **self._segment_columns(found.nearest, "")}
            )  # host synchronization (with the scan's)
            for j, i in enumerate(again):
                cluster = int(rescanned["nearest"][j])
                self.nearest[i] = (cluster, rescanned["distance"][j]) if cluster >= 0 else (-1, math.inf)
                if cluster >= 0:
                    self.segments[cluster] = _segment_at(rescanned, "", j)
        for c in sorted(self.touched):
            distances = torch.linalg.vector_norm(self.host_keys - self.touched[c].center, dim=1).tolist()
            for i, distance in enumerate(distances):
                best_c, best_d = self.nearest[i]
                if distance < best_d or (distance == best_d and c < best_c):
                    self.nearest[i] = (c, distance)

    # --- 3. MELO's rules -------------------------------------------------------------------------------
    def fetch_reached(self) -> None:
        """Bring the clusters MELO's rules will touch to the host in one transfer: a key's nearest cluster,
        when the key is within its radius + the key's radius."""
        segments = self.segments
        reached = sorted(
            {c for (c, d), radius in zip(self.nearest, self.radii, strict=True) if c >= 0 and c not in self.touched
             and not d > segments[c].radius + radius}
        )
        if not reached:
            return
        fetched_keys, pieces, centers = self._fetch(
            self.keys if self.host_keys is None else None, [segments[c] for c in reached], reached
        )
        self.host_keys = fetched_keys if self.host_keys is None else self.host_keys
        for c, piece, center in zip(reached, pieces, centers, strict=True):
            segment = segments[c]
            self.touched[c] = TouchedCluster(c, segment, segment.radius, center[0], piece,
                                             list(range(segment.first, segment.end)))

    def _fetch(self, keys: torch.Tensor | None, segments: list[Segment], center_rows: list[int]):
        """One device-to-host transfer: the keys (if given), the points of ``segments``, and center rows."""
        db = self.db
        parts = ([] if keys is None else [keys]) + [db.points[s.first : s.end] for s in segments]
        parts += [db.centers[c : c + 1] for c in center_rows]
        host = torch.cat(parts).cpu() if parts else torch.empty(0, db.dim)
        sizes = ([] if keys is None else [keys.shape[0]]) + [s.end - s.first for s in segments]
        sizes += [1] * len(center_rows)
        pieces = list(host.split(sizes)) if sizes else []
        host_keys = pieces.pop(0) if keys is not None else None
        return host_keys, pieces[: len(segments)], pieces[len(segments) :]

    def apply_rules(self) -> None:
        """MELO's rules, key by key, against the nearest clusters found above: far → new cluster; same
        label → merge; another label → conflict split, forgetting points left outside (with the database's
        ``conflict_rule`` ``"voronoi"``: a new cluster of the key's radius, the old one unchanged)."""
        counts = self.counts
        for i, ((c, distance), radius) in enumerate(zip(self.nearest, self.radii, strict=True)):
            cluster = self.touched.get(c)
            if c < 0 or distance > (cluster.radius if cluster else self.segments[c].radius) + radius:
                self.new_clusters.append((i, radius))
                counts.new_clusters += 1
            elif cluster.segment.label == self.labels[i]:
                cluster.vectors = torch.cat([cluster.vectors, self.host_keys[i : i + 1]])
                cluster.sources.append(-1 - i)
                cluster.radius = max(covering_radius(cluster.recenter(), self.db.dim), radius)
                counts.merged += 1
            elif self.db.conflict_rule == "voronoi":  # both keep their radii: the nearer center decides
                self.new_clusters.append((i, radius))
                counts.conflicts += 1
            else:
                self.new_clusters.append((i, distance / 2 + SPLIT_MARGIN))
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

    # --- 4. rebuild ------------------------------------------------------------------------------------
    def rebuild(self) -> Placed:
        """The database's tensors after the batch: untouched runs of the old ones, touched clusters' new
        rows and points, then the new clusters. The database's tensors are never written: the small ones
        are concatenated afresh; centers and points get the new rows appended past every view
        (:class:`~melo_fast.vecdb.rows.RowBuffer`) unless a row or segment in the middle changes, and are
        then concatenated into a new buffer."""
        db, touched, dead, new_clusters = self.db, self.touched, self.dead, self.new_clusters
        device, n_clusters, n_points = db.device, db.num_clusters, len(db)
        gone = sorted(dead)
        runs, start = [], 0
        for c in gone + [n_clusters]:
            if c > start:
                runs.append((start, c))
            start = c + 1
        order = sorted(touched)
        n_new = len(new_clusters)
        new_keys = self.keys[_upload([i for i, _ in new_clusters], torch.int64, device)]

        def per_cluster(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            return torch.cat([old[a:b] for a, b in runs] + [new])

        radii = per_cluster(db.radii, _upload([r for _, r in new_clusters], torch.float32, device))
        new_labels = _upload([self.labels[i] for i, _ in new_clusters], torch.int64, device)
        cluster_labels = per_cluster(db.cluster_labels, new_labels)
        ones = torch.ones(n_new, dtype=torch.int64, device=device)
        sizes = per_cluster(db.point_offsets[1:] - db.point_offsets[:-1], ones)
        sq_norms = per_cluster(self.center_sq_norms, squared_norms(new_keys))
        reaches = per_cluster(self.reach, torch.zeros(n_new, device=device))  # a new cluster's point is its center
        if gone or any(touched[c].moved for c in order):
            center_rows, centers = RowBuffer.concatenated([db.centers[a:b] for a, b in runs] + [new_keys], db.centers)
        else:
            center_rows, centers = RowBuffer.appended(self.center_rows, db.centers, new_keys)
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
            point_rows, points = RowBuffer.appended(self.point_rows, db.points, new_keys)
            point_blocks = torch.cat([db.point_blocks, ones * self.block_id])
            return Placed(centers, center_rows, radii, cluster_labels, offsets, points, point_rows, point_blocks,
                          sq_norms, reaches, self.counts)
        sources = _upload([s for c in changed if c in touched for s in touched[c].sources], torch.int64, device)
        old_blocks = db.point_blocks[sources.clamp(min=0)] if n_points else torch.zeros_like(sources)
        member_blocks = torch.where(sources >= 0, old_blocks, self.block_id)
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
        block_pieces += [db.point_blocks[previous:n_points], ones * self.block_id]
        point_rows, points = RowBuffer.concatenated(point_pieces, db.points)
        return Placed(centers, center_rows, radii, cluster_labels, offsets, points, point_rows, torch.cat(block_pieces),
                      sq_norms, reaches, self.counts)
