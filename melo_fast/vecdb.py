"""VectorDatabase: MELO's inner vector database, kept as tensors.

Clusters have a center, a radius and a label (the edit's target, compared exactly); points are the
stored keys with the block each one routes to, grouped by cluster (CSR offsets) so a search is one
call to ``melo_fast.ops.vecdb_search``.

Insertion follows the rules of DESIGN §1 plus one deliberate fix, the re-edit rule (DESIGN §2.10):
a new key that coincides with a stored point of another label takes that point over, so correcting
an edit works (MELO's own conflict split at distance 0 would drop both edits).

Immutability: a database that routing can see is never modified. Its tensors are never written in
place; :meth:`insert` builds new tensors and rebinds them only once the whole batch has been placed
(so a failed insert changes nothing), and the editor inserts into a :meth:`copy` that it then
publishes. That is what lets inference threads search a database while an edit is committed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from melo_fast import ops
from melo_fast.ops.vectorized import nearest

# MELO splits a conflicting cluster at half the distance, 1e-5 to each side (DESIGN §1).
SPLIT_MARGIN = 1e-5
# Two keys "coincide" (are the same input, up to numerical noise) within this fraction of init_radius.
# Why a fraction of the radius: routing already needs the radius to exceed the keys' numerical noise
# (or an edited input would miss its own edit) and to stay below the distance between distinct inputs
# (or it would capture them); a tenth of it sits well inside both bounds, at any key scale.
COINCIDE_FRACTION = 0.1


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


def coinciding_conflicts(keys: torch.Tensor, labels: list[tuple[int, ...]], tolerance: float) -> list[tuple[int, int]]:
    """Pairs of rows ``(i, j)`` of one batch whose keys coincide but whose labels differ.

    Such a batch asks for two different answers to the same input; no block can hold both.
    """
    if keys.shape[0] < 2:
        return []
    distances = torch.cdist(keys.float(), keys.float())
    close = (distances <= tolerance).triu(diagonal=1).nonzero().tolist()
    return [(i, j) for i, j in close if tuple(labels[i]) != tuple(labels[j])]


class VectorDatabase:
    """Clusters of keys, each routing to the block of its nearest point.

    Tensors (all on one device, keys in float32):
        centers ``[C, d]``, radii ``[C]``, cluster_labels ``[C]`` int64 (index into ``labels``),
        point_offsets ``[C + 1]`` int64, points ``[P, d]``, point_blocks ``[P]`` int64.
    ``labels`` is the list of distinct edit targets (tuples of ints) seen so far.
    ``init_radius`` is None until it is known (``MeloConfig.init_radius="auto"`` sets it at the first
    edit from ``key_scale``, the model's measured key scale; see ``melo_fast.calibration``).
    """

    def __init__(
        self,
        dim: int,
        init_radius: float | None,
        device: torch.device | str = "cpu",
        key_scale: float | None = None,
    ):
        self.dim = dim
        self.init_radius = None if init_radius is None else float(init_radius)
        self.key_scale = key_scale
        self.device = torch.device(device)
        self.centers = torch.empty(0, dim, device=self.device)
        self.radii = torch.empty(0, device=self.device)
        self.cluster_labels = torch.empty(0, dtype=torch.int64, device=self.device)
        self.point_offsets = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.points = torch.empty(0, dim, device=self.device)
        self.point_blocks = torch.empty(0, dtype=torch.int64, device=self.device)
        self.labels: list[tuple[int, ...]] = []
        self.conflicts = 0
        self.forgotten = 0
        self.superseded = 0

    def __len__(self) -> int:
        """Number of stored keys (points)."""
        return self.points.shape[0]

    @property
    def num_clusters(self) -> int:
        return self.centers.shape[0]

    @property
    def coincide_tolerance(self) -> float:
        """Distance within which two keys are the same input (see ``COINCIDE_FRACTION``)."""
        if self.init_radius is None:
            raise RuntimeError("VectorDatabase: init_radius is not set yet")
        return COINCIDE_FRACTION * self.init_radius

    def copy(self) -> VectorDatabase:
        """A database with the same contents that can be inserted into without touching this one.

        O(1): the tensors are shared, which is safe because they are never written in place.
        """
        twin = copy.copy(self)
        twin.labels = list(self.labels)
        return twin

    def search(self, queries: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """``[Q, d]`` keys → ``[Q]`` int64 block ids (-1: outside every edit's scope)."""
        if queries.shape[-1] != self.dim:
            raise ValueError(f"VectorDatabase.search: keys have dim {queries.shape[-1]}, the database holds {self.dim}")
        return ops.vecdb_search(
            queries.to(self.device),
            self.centers,
            self.radii,
            self.point_offsets,
            self.points,
            self.point_blocks,
            backend=backend,
        )

    def stats(self) -> dict:
        """Clusters, points, conflicts, forgotten/superseded points and distinct blocks the points route to."""
        return {
            "clusters": self.num_clusters,
            "points": len(self),
            "conflicts": self.conflicts,
            "forgotten_points": self.forgotten,
            "superseded_points": self.superseded,
            "blocks_used": int(torch.unique(self.point_blocks[self.point_blocks >= 0]).numel()),
        }

    def _point_clusters(self) -> torch.Tensor:
        """``[P]`` cluster index of every point, from the CSR offsets."""
        counts = self.point_offsets[1:] - self.point_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_clusters, device=self.device), counts)

    def insert(self, keys: torch.Tensor, labels: list[tuple[int, ...]], block_id: int) -> InsertCounts:
        """Place the keys of one edit batch, all routing to ``block_id``.

        Rules (DESIGN §1 and §2.10), applied in this order:

        1. Re-edits: a key within ``coincide_tolerance`` of a stored point whose cluster has another
           label supersedes that point: the point is removed, its cluster's center and radius are
           recomputed from the points left (the radius never grows), and a cluster left without
           points is removed. Other stored edits are untouched.
        2. MELO's rules, with each key's nearest cluster computed once for the batch, after step 1:
           far → new cluster; same label → merge (center = mean, radius = max(spread, init_radius));
           other label → conflict split at half the distance, forgetting points left outside.

        Args:
            keys: ``[N, d]`` float keys of the batch.
            labels: ``N`` edit targets (tuples of ints); equal tuples are the same label.
            block_id: the block the batch trained.

        Raises:
            ValueError: bad shapes, or two keys of the batch coincide with different labels (nothing
                changes).
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"VectorDatabase.insert: keys must be [N, {self.dim}], got {tuple(keys.shape)}")
        if len(labels) != keys.shape[0]:
            raise ValueError(f"VectorDatabase.insert: {keys.shape[0]} keys but {len(labels)} labels")
        if self.init_radius is None:
            raise RuntimeError("VectorDatabase.insert: init_radius is not set yet")
        keys = keys.detach().to(self.device, torch.float32)
        labels = [tuple(int(t) for t in label) for label in labels]
        clashes = coinciding_conflicts(keys, labels, self.coincide_tolerance)
        if clashes:
            raise ValueError(
                f"VectorDatabase.insert: rows {clashes} of the batch are the same input with different targets"
            )
        counts = InsertCounts()
        label_list = list(self.labels)
        label_index = {label: i for i, label in enumerate(label_list)}
        for label in labels:
            if label not in label_index:
                label_index[label] = len(label_list)
                label_list.append(label)
        key_labels = [label_index[label] for label in labels]

        centers = list(self.centers.unbind(0))
        radii = self.radii.tolist()
        cluster_labels = self.cluster_labels.tolist()
        alive = [True] * len(centers)  # clusters emptied by re-edits are removed
        # Points: the old ones (with a keep flag) followed by this batch's.
        point_vectors = list(self.points.unbind(0))
        point_cluster = self._point_clusters().tolist()
        point_block = self.point_blocks.tolist()
        keep = [True] * len(point_vectors)

        def members(cluster):
            return [p for p, c in enumerate(point_cluster) if c == cluster and keep[p]]

        def spread(member_vectors, center) -> float:
            return torch.linalg.vector_norm(member_vectors - center, dim=1).max().item()

        # 1. Re-edits supersede the stored points they coincide with.
        if len(point_vectors):
            nearest_point, point_dist = nearest(keys, self.points)
            touched = set()
            for i, (p, dist) in enumerate(zip(nearest_point.tolist(), point_dist.tolist(), strict=True)):
                c = point_cluster[p]
                if dist <= self.coincide_tolerance and keep[p] and cluster_labels[c] != key_labels[i]:
                    keep[p] = False
                    touched.add(c)
                    counts.superseded += 1
            for c in sorted(touched):
                left = members(c)
                if not left:
                    alive[c] = False
                    continue
                member_vectors = torch.stack([point_vectors[p] for p in left])
                centers[c] = member_vectors.mean(0)
                radii[c] = min(radii[c], max(spread(member_vectors, centers[c]), self.init_radius))

        # 2. MELO's rules against the clusters left after step 1.
        candidates = [c for c in range(len(centers)) if alive[c]]
        if candidates:
            # Nearest old cluster of every key, computed once before any insert (DESIGN §1).
            index, distance = nearest(keys, torch.stack([centers[c] for c in candidates]))
            nearest_cluster = [candidates[i] for i in index.tolist()]
            nearest_dist = distance.tolist()

        def add_cluster(center, radius, label_id):
            centers.append(center)
            radii.append(radius)
            cluster_labels.append(label_id)
            alive.append(True)
            return len(centers) - 1

        def add_point(vector, cluster):
            point_vectors.append(vector)
            point_cluster.append(cluster)
            point_block.append(block_id)
            keep.append(True)

        for i, (key, label_id) in enumerate(zip(keys, key_labels, strict=True)):
            if not candidates:
                add_point(key, add_cluster(key, self.init_radius, label_id))
                counts.new_clusters += 1
                continue
            c, dist = nearest_cluster[i], nearest_dist[i]
            if dist > radii[c] + self.init_radius:
                add_point(key, add_cluster(key, self.init_radius, label_id))
                counts.new_clusters += 1
            elif cluster_labels[c] == label_id:
                add_point(key, c)
                member_vectors = torch.stack([point_vectors[p] for p in members(c)])
                centers[c] = member_vectors.mean(0)
                radii[c] = max(spread(member_vectors, centers[c]), self.init_radius)
                counts.merged += 1
            else:
                add_point(key, add_cluster(key, dist / 2 + SPLIT_MARGIN, label_id))
                radii[c] = dist / 2 - SPLIT_MARGIN
                for p in members(c):
                    if torch.linalg.vector_norm(point_vectors[p] - centers[c]).item() > radii[c]:
                        keep[p] = False  # an emptied cluster keeps its center and routes to "none"
                        counts.forgotten += 1
                counts.conflicts += 1

        # Renumber the clusters left alive and lay their points out in CSR order.
        live = [c for c in range(len(centers)) if alive[c]]
        renumber = {c: i for i, c in enumerate(live)}
        kept = [p for p in range(len(point_vectors)) if keep[p]]
        cluster_of_point = torch.tensor([renumber[point_cluster[p]] for p in kept], dtype=torch.int64)
        order = torch.argsort(cluster_of_point, stable=True).to(self.device)
        per_cluster = torch.bincount(cluster_of_point, minlength=len(live))
        offsets = torch.zeros(len(live) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(per_cluster, 0)

        # Commit: nothing above touched self, so a failure leaves the database as it was.
        self.centers = torch.stack([centers[c] for c in live]) if live else self.centers.new_empty(0, self.dim)
        self.radii = torch.tensor([radii[c] for c in live], dtype=torch.float32, device=self.device)
        self.cluster_labels = torch.tensor([cluster_labels[c] for c in live], dtype=torch.int64, device=self.device)
        self.point_offsets = offsets.to(self.device)
        self.points = (
            torch.stack([point_vectors[p] for p in kept])[order] if kept else self.points.new_empty(0, self.dim)
        )
        self.point_blocks = torch.tensor([point_block[p] for p in kept], dtype=torch.int64, device=self.device)[order]
        self.labels = label_list
        self.conflicts += counts.conflicts
        self.forgotten += counts.forgotten
        self.superseded += counts.superseded
        return counts

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (for safetensors) and JSON-able metadata that fully describe the database."""
        tensors = {
            "centers": self.centers,
            "radii": self.radii,
            "cluster_labels": self.cluster_labels,
            "point_offsets": self.point_offsets,
            "points": self.points,
            "point_blocks": self.point_blocks,
        }
        meta = {
            "dim": self.dim,
            "init_radius": self.init_radius,
            "key_scale": self.key_scale,
            "labels": [list(label) for label in self.labels],
            "conflicts": self.conflicts,
            "forgotten": self.forgotten,
            "superseded": self.superseded,
        }
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict, device) -> VectorDatabase:
        """Inverse of :meth:`state_dict`; checks shapes so a corrupt save fails loudly (ValueError)."""
        dim = int(meta["dim"])
        missing = [name for name in _TENSOR_DTYPES if name not in tensors]
        if missing:
            raise ValueError(f"database tensors {missing} are missing")
        n_clusters = tensors["centers"].shape[0]
        n_points = tensors["points"].shape[0]
        expected = {
            "centers": (n_clusters, dim),
            "radii": (n_clusters,),
            "cluster_labels": (n_clusters,),
            "point_offsets": (n_clusters + 1,),
            "points": (n_points, dim),
            "point_blocks": (n_points,),
        }
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                found = tuple(tensors[name].shape)
                raise ValueError(f"database tensor {name!r} has shape {found}, expected {shape}")
        offsets = tensors["point_offsets"]
        if int(offsets[0]) != 0 or int(offsets[-1]) != n_points or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("database point offsets do not cover the points in order")
        labels = [tuple(int(t) for t in label) for label in meta["labels"]]
        cluster_labels = tensors["cluster_labels"]
        if n_clusters and (int(cluster_labels.min()) < 0 or int(cluster_labels.max()) >= len(labels)):
            raise ValueError("database cluster labels point outside the saved label list")
        radius = meta["init_radius"]
        db = cls(dim, radius, device=device, key_scale=meta.get("key_scale"))
        for name, dtype in _TENSOR_DTYPES.items():
            setattr(db, name, tensors[name].to(db.device, dtype))
        db.labels = labels
        db.conflicts = int(meta["conflicts"])
        db.forgotten = int(meta["forgotten"])
        db.superseded = int(meta.get("superseded", 0))
        return db


_TENSOR_DTYPES = {
    "centers": torch.float32,
    "radii": torch.float32,
    "cluster_labels": torch.int64,
    "point_offsets": torch.int64,
    "points": torch.float32,
    "point_blocks": torch.int64,
}
