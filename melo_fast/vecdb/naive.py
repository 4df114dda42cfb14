"""A deliberately plain implementation of the vector database's rules, beside the fast one: its oracle
(``tests/test_vecdb_oracle.py``).

A list of cluster objects and loops, read straight from DESIGN §1 and §2.10 (and the docstring of
``VectorDatabase.insert``); no tensors of the database, no candidates, no bounds. Never optimize it:
its only job is to be obviously right. It imports nothing of the fast code (its constants are its
own copies), so a mistake there cannot hide in both.

Conventions it shares with the real database, because they are part of the rules:

- a distance is ``torch.linalg.vector_norm(a - b)`` of float32 vectors (rows of one stacked tensor
  here, which gives the same bits as one pair at a time);
- "nearest" is the lowest distance, ties to the lowest index (clusters in order of creation, points
  in order of arrival within their cluster, clusters' points in cluster order);
- radii are Python floats while a batch is placed and float32 once it is stored.
"""

from __future__ import annotations

import math

import torch

SPLIT_MARGIN = 1e-5
COINCIDE_FRACTION = 0.1


def to_float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def covering(spread: float, dim: int) -> float:
    """A merged cluster's radius: its spread, widened by twice the rounding bound of a ``dim``-term
    float32 norm so that its farthest point stays inside whichever backend measures it."""
    unit_roundoff = 2.0**-24
    k = (dim + 2) * unit_roundoff
    return spread * (1.0 + 2.0 * k / (1.0 - k))


def stack(vectors: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(vectors) if vectors else None


def distances(key: torch.Tensor, vectors: torch.Tensor | None) -> list[float]:
    """Distance from ``key`` to each row of ``vectors`` (None: no rows)."""
    if vectors is None:
        return []
    return torch.linalg.vector_norm(key - vectors, dim=1).tolist()


def lowest(values: list[float]) -> tuple[int, float]:
    """Index and value of the smallest value, the first one on ties; (-1, inf) for an empty list."""
    best, best_value = -1, math.inf
    for i, value in enumerate(values):
        if value < best_value:
            best, best_value = i, value
    return best, best_value


class Cluster:
    def __init__(self, key: torch.Tensor, radius: float, label: tuple, block: int):
        self.center = key
        self.radius = radius
        self.label = label
        self.points = [(key, block)]  # (key, block id)

    def keys(self) -> list[torch.Tensor]:
        return [key for key, _ in self.points]

    def recenter(self) -> float:
        """Center = mean of the points; returns the largest point distance from it."""
        self.center = torch.stack(self.keys()).mean(0)
        return max(distances(self.center, stack(self.keys())))


class OracleDatabase:
    def __init__(self, init_radius: float, conflict_rule: str = "split"):
        self.init_radius = init_radius
        self.conflict_rule = conflict_rule
        self.tolerance = COINCIDE_FRACTION * init_radius
        self.clusters: list[Cluster] = []
        self.labels: list[tuple] = []
        self.conflicts = self.forgotten = self.superseded = 0

    def insert(self, keys: torch.Tensor, labels: list[tuple], block: int, radii: list[float] | None = None) -> dict:
        keys = list(keys.float())
        radii = [self.init_radius] * len(keys) if radii is None else list(radii)
        labels = [tuple(label) for label in labels]
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                if distances(keys[i], keys[j][None])[0] <= self.tolerance and labels[i] != labels[j]:
                    raise ValueError(f"rows {i} and {j} are the same input with different targets")
        for label in labels:
            if label not in self.labels:
                self.labels.append(label)
        counts = {"new_clusters": 0, "merged": 0, "conflicts": 0, "forgotten": 0, "superseded": 0}

        # 1. Re-edits: the nearest stored point (found before any of them is removed).
        stored = [(cluster, point) for cluster in self.clusters for point in cluster.points]
        stored_keys = stack([point[0] for _, point in stored])
        removed = []
        for key, label in zip(keys, labels, strict=True):
            p, distance = lowest(distances(key, stored_keys))
            if p < 0 or distance > self.tolerance:
                continue
            cluster, point = stored[p]
            if cluster.label != label and not any(point is gone for gone in removed):
                removed.append(point)
                counts["superseded"] += 1
        for cluster in list(self.clusters):
            left = [point for point in cluster.points if not any(point is gone for gone in removed)]
            if len(left) == len(cluster.points):
                continue
            if not left:
                self.clusters.remove(cluster)
                continue
            cluster.points = left
            spread = covering(cluster.recenter(), len(cluster.center))
            cluster.radius = min(cluster.radius, max(spread, self.init_radius))

        # 2. MELO's rules; nearest clusters once, before any key of the batch is placed.
        candidates = list(self.clusters)
        centers = stack([c.center for c in candidates])
        nearest = [lowest(distances(key, centers)) for key in keys]
        for key, label, (c, distance), radius in zip(keys, labels, nearest, radii, strict=True):
            cluster = candidates[c] if c >= 0 else None
            if cluster is None or distance > cluster.radius + radius:
                self.clusters.append(Cluster(key, radius, label, block))
                counts["new_clusters"] += 1
            elif cluster.label == label:
                cluster.points.append((key, block))
                cluster.radius = max(covering(cluster.recenter(), len(cluster.center)), radius)
                counts["merged"] += 1
            elif self.conflict_rule == "voronoi":
                self.clusters.append(Cluster(key, radius, label, block))
                counts["conflicts"] += 1
            else:
                self.clusters.append(Cluster(key, distance / 2 + SPLIT_MARGIN, label, block))
                cluster.radius = distance / 2 - SPLIT_MARGIN
                spread = distances(cluster.center, stack(cluster.keys()))
                kept = [point for point, d in zip(cluster.points, spread, strict=True) if d <= cluster.radius]
                counts["forgotten"] += len(cluster.points) - len(kept)
                cluster.points = kept  # an emptied cluster stays, routing to "none"
                counts["conflicts"] += 1
        for cluster in self.clusters:
            cluster.radius = to_float32(cluster.radius)
        self.conflicts += counts["conflicts"]
        self.forgotten += counts["forgotten"]
        self.superseded += counts["superseded"]
        return counts

    def search(self, queries: torch.Tensor) -> list[int]:
        centers = stack([cluster.center for cluster in self.clusters])
        blocks = []
        for query in queries.float():
            c, distance = lowest(distances(query, centers))
            if c < 0 or distance > self.clusters[c].radius:
                blocks.append(-1)
                continue
            cluster = self.clusters[c]
            p, _ = lowest(distances(query, stack(cluster.keys())))
            blocks.append(cluster.points[p][1] if p >= 0 else -1)
        return blocks
