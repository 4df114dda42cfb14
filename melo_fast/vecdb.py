"""VectorDatabase: MELO's inner vector database, kept as tensors.

Clusters have a center, a radius and a label (the edit's target, compared exactly); points are the
stored keys with the block each one routes to, grouped by cluster (CSR offsets) so a search is one
call to ``melo_fast.ops.vecdb_search``. Insertion follows the official code (DESIGN §1) and is
atomic: the tensors are replaced only once the whole batch has been placed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from melo_fast import ops
from melo_fast.ops.vectorized import nearest

# The official code splits a conflicting cluster at half the distance, 1e-5 to each side.
SPLIT_MARGIN = 1e-5


@dataclass
class InsertCounts:
    """How the keys of one edit batch were placed."""

    new_clusters: int = 0
    merged: int = 0
    conflicts: int = 0
    forgotten: int = 0


class VectorDatabase:
    """Clusters of keys, each routing to the block of its nearest point.

    Tensors (all on one device, keys in float32):
        centers ``[C, d]``, radii ``[C]``, cluster_labels ``[C]`` int64 (index into ``labels``),
        point_offsets ``[C + 1]`` int64, points ``[P, d]``, point_blocks ``[P]`` int64.
    ``labels`` is the list of distinct edit targets (tuples of ints) seen so far.
    """

    def __init__(self, dim: int, init_radius: float, device: torch.device | str = "cpu"):
        self.dim = dim
        self.init_radius = float(init_radius)
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

    def __len__(self) -> int:
        """Number of stored keys (points)."""
        return self.points.shape[0]

    @property
    def num_clusters(self) -> int:
        return self.centers.shape[0]

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
        """Clusters, points, conflicts, forgotten points and distinct blocks the points route to."""
        return {
            "clusters": self.num_clusters,
            "points": len(self),
            "conflicts": self.conflicts,
            "forgotten_points": self.forgotten,
            "blocks_used": int(torch.unique(self.point_blocks[self.point_blocks >= 0]).numel()),
        }

    def _point_clusters(self) -> torch.Tensor:
        """``[P]`` cluster index of every point, from the CSR offsets."""
        counts = self.point_offsets[1:] - self.point_offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_clusters, device=self.device), counts)

    def insert(self, keys: torch.Tensor, labels: list[tuple[int, ...]], block_id: int) -> InsertCounts:
        """Place the keys of one edit batch, all routing to ``block_id`` (DESIGN §1, "Insert").

        Args:
            keys: ``[N, d]`` float keys of the batch.
            labels: ``N`` edit targets (tuples of ints); equal tuples are the same label.
            block_id: the block the batch trained.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"VectorDatabase.insert: keys must be [N, {self.dim}], got {tuple(keys.shape)}")
        if len(labels) != keys.shape[0]:
            raise ValueError(f"VectorDatabase.insert: {keys.shape[0]} keys but {len(labels)} labels")
        keys = keys.detach().to(self.device, torch.float32)
        counts = InsertCounts()
        label_list = list(self.labels)
        label_index = {label: i for i, label in enumerate(label_list)}

        n_old = self.num_clusters
        centers = list(self.centers.unbind(0))
        radii = self.radii.tolist()
        cluster_labels = self.cluster_labels.tolist()
        # Points: the old ones (with a keep flag, for forgetting) followed by this batch's.
        point_vectors = list(self.points.unbind(0))
        point_cluster = self._point_clusters().tolist()
        point_block = self.point_blocks.tolist()
        keep = [True] * len(point_vectors)

        if n_old:
            # Nearest old cluster of every key, computed once before any insert (official behaviour).
            nearest_cluster, nearest_dist = nearest(keys, self.centers)
            nearest_cluster, nearest_dist = nearest_cluster.tolist(), nearest_dist.tolist()

        def add_cluster(center, radius, label_id):
            centers.append(center)
            radii.append(radius)
            cluster_labels.append(label_id)
            return len(centers) - 1

        def add_point(vector, cluster):
            point_vectors.append(vector)
            point_cluster.append(cluster)
            point_block.append(block_id)
            keep.append(True)

        def members(cluster):
            return [p for p, c in enumerate(point_cluster) if c == cluster and keep[p]]

        for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
            label = tuple(int(t) for t in label)
            if label not in label_index:
                label_index[label] = len(label_list)
                label_list.append(label)
            label_id = label_index[label]
            if not n_old:
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
                spread = torch.linalg.vector_norm(member_vectors - centers[c], dim=1).max().item()
                radii[c] = max(spread, self.init_radius)
                counts.merged += 1
            else:
                add_point(key, add_cluster(key, dist / 2 + SPLIT_MARGIN, label_id))
                radii[c] = dist / 2 - SPLIT_MARGIN
                for p in members(c):
                    if torch.linalg.vector_norm(point_vectors[p] - centers[c]).item() > radii[c]:
                        keep[p] = False  # an emptied cluster keeps its center and routes to "none"
                        counts.forgotten += 1
                counts.conflicts += 1

        kept = [p for p in range(len(point_vectors)) if keep[p]]
        cluster_of_point = torch.tensor([point_cluster[p] for p in kept], dtype=torch.int64, device=self.device)
        order = torch.argsort(cluster_of_point, stable=True)
        per_cluster = torch.bincount(cluster_of_point, minlength=len(centers))
        offsets = torch.zeros(len(centers) + 1, dtype=torch.int64, device=self.device)
        offsets[1:] = torch.cumsum(per_cluster, 0)
        empty_points = torch.empty(0, self.dim, device=self.device)

        # Commit: nothing above touched self, so a failure leaves the database as it was.
        self.centers = torch.stack(centers)
        self.radii = torch.tensor(radii, dtype=torch.float32, device=self.device)
        self.cluster_labels = torch.tensor(cluster_labels, dtype=torch.int64, device=self.device)
        self.point_offsets = offsets
        self.points = torch.stack([point_vectors[p] for p in kept])[order] if kept else empty_points
        self.point_blocks = torch.tensor([point_block[p] for p in kept], dtype=torch.int64, device=self.device)[order]
        self.labels = label_list
        self.conflicts += counts.conflicts
        self.forgotten += counts.forgotten
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
            "labels": [list(label) for label in self.labels],
            "conflicts": self.conflicts,
            "forgotten": self.forgotten,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of :meth:`state_dict`; checks shapes so a corrupt save fails loudly."""
        if meta["dim"] != self.dim:
            raise ValueError(f"saved database has key dim {meta['dim']}, this model's router gives {self.dim}")
        n_clusters = tensors["centers"].shape[0]
        n_points = tensors["points"].shape[0]
        expected = {
            "centers": (n_clusters, self.dim),
            "radii": (n_clusters,),
            "cluster_labels": (n_clusters,),
            "point_offsets": (n_clusters + 1,),
            "points": (n_points, self.dim),
            "point_blocks": (n_points,),
        }
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                found = tuple(tensors[name].shape)
                raise ValueError(f"saved database tensor {name!r} has shape {found}, expected {shape}")
        if int(tensors["point_offsets"][-1]) != n_points:
            raise ValueError("saved database is corrupt: point offsets do not cover the points")
        for name in expected:
            dtype = torch.int64 if name in ("cluster_labels", "point_offsets", "point_blocks") else torch.float32
            setattr(self, name, tensors[name].to(self.device, dtype))
        self.labels = [tuple(label) for label in meta["labels"]]
        self.init_radius = float(meta["init_radius"])
        self.conflicts = int(meta["conflicts"])
        self.forgotten = int(meta["forgotten"])
