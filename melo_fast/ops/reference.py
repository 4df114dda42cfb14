"""Pure-torch specification of every op: the rules of DESIGN §1, as plain loops.

This is the parity oracle for every other backend and the slow baseline in the benchmarks. The MELO
paper's released implementation is not in this repository to compare it with: what backs it is DESIGN §1 and
hand-derived tests in tests/test_ops.py (each rule of the search, and the block LoRA formula, on
hand-made values; ties, empty and all-miss databases). Keep it plain: Python loops over queries,
clusters, points and samples, as the algorithm reads. Never optimize it.
"""

from __future__ import annotations

import math

import torch

from melo_fast.ops.registry import Backend


def vecdb_search_ref(
    queries: torch.Tensor,
    centers: torch.Tensor,
    radii: torch.Tensor,
    point_offsets: torch.Tensor,
    points: torch.Tensor,
    point_blocks: torch.Tensor,
) -> torch.Tensor:
    """Block id per query: nearest cluster center, radius check, then nearest point of that cluster.

    Distances are Euclidean, computed in fp32. Ties go to the lowest index (strict ``<``).
    See :func:`melo_fast.ops.vecdb_search` for shapes.
    """
    result = []
    for query in queries.float():
        best_cluster, best_dist = -1, math.inf
        for c in range(centers.shape[0]):
            dist = torch.linalg.vector_norm(query - centers[c].float()).item()
            if dist < best_dist:
                best_cluster, best_dist = c, dist
        if best_cluster < 0 or best_dist > radii[best_cluster].item():
            result.append(-1)
            continue
        best_point, best_point_dist = -1, math.inf
        for p in range(int(point_offsets[best_cluster]), int(point_offsets[best_cluster + 1])):
            dist = torch.linalg.vector_norm(query - points[p].float()).item()
            if dist < best_point_dist:
                best_point, best_point_dist = p, dist
        result.append(int(point_blocks[best_point]) if best_point >= 0 else -1)
    return torch.tensor(result, dtype=torch.int64, device=queries.device)


def block_lora_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + scale * (x @ A[b].T) @ B[b]`` one sample at a time; samples with block -1 get ``base``.

    See :func:`melo_fast.ops.block_lora` for shapes. Differentiable through autograd.
    """
    rows = []
    for i, block in enumerate(block_ids.tolist()):
        row = base[i] if base is not None else torch.zeros(x.shape[1], B.shape[2], dtype=x.dtype, device=x.device)
        if block >= 0:
            row = row + scale * ((x[i] @ A[block].T) @ B[block])
        rows.append(row)
    if not rows:
        return x.new_zeros(0, x.shape[1], B.shape[2])
    return torch.stack(rows)


class ReferenceBackend(Backend):
    """The ``reference`` backend: the two functions above."""

    name = "reference"

    def vecdb_search(self, queries, centers, radii, point_offsets, points, point_blocks):
        return vecdb_search_ref(queries, centers, radii, point_offsets, points, point_blocks)

    def block_lora(self, x, A, B, block_ids, scale, base):
        return block_lora_ref(x, A, B, block_ids, scale, base)


_BACKEND = ReferenceBackend()


def load() -> ReferenceBackend:
    return _BACKEND
