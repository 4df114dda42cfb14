"""The ``torch`` backend: the same ops as ``reference.py``, vectorized with plain torch calls.

No Python loop over queries, clusters, points, samples or blocks, and no host synchronization,
so it runs on any device and is the fallback when no compiled backend is available (and for the
dtypes the compiled kernels do not take). ``torch.compile`` traces it like any torch code.
"""

from __future__ import annotations

import torch

from melo_fast.ops.registry import Backend


def nearest(queries: torch.Tensor, vectors: torch.Tensor, allowed: torch.Tensor | None = None):
    """Index of and exact distance to the nearest row of ``vectors`` for each query (fp32 inputs).

    Candidates come from ``||v||² - 2 q·v`` (one GEMM, like the kernels' stage 1); the best two are
    then re-checked with exact differences so the answer matches the reference loop, ties going to
    the lowest index as ``argmin`` does. ``allowed`` ([Q, N] bool) excludes rows per query; a query
    with no allowed row gets distance ``inf``.
    """
    scores = (vectors * vectors).sum(-1)[None, :] - 2.0 * (queries @ vectors.T)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("inf"))
    first = scores.argmin(dim=1)
    candidates = first[:, None]
    if vectors.shape[0] > 1:
        second = scores.scatter(1, first[:, None], float("inf")).argmin(dim=1)
        candidates = torch.stack([first, second], dim=1)
    exact = torch.linalg.vector_norm(queries[:, None, :] - vectors[candidates], dim=-1)
    if allowed is not None:
        exact = exact.masked_fill(~allowed.gather(1, candidates), float("inf"))
    best_dist = exact.min(dim=1, keepdim=True).values
    # Among exactly tied candidates keep the lowest index.
    sentinel = torch.iinfo(torch.int64).max
    best = torch.where(exact == best_dist, candidates, sentinel).min(dim=1).values
    best = torch.where(best == sentinel, first, best)  # no finite candidate: any index will do
    return best, best_dist[:, 0]


def vecdb_search(queries, centers, radii, point_offsets, points, point_blocks):
    """Vectorized :func:`melo_fast.ops.vecdb_search` (see there for shapes)."""
    n_queries = queries.shape[0]
    if centers.shape[0] == 0 or points.shape[0] == 0:
        return torch.full((n_queries,), -1, dtype=torch.int64, device=queries.device)
    queries = queries.float()
    cluster, cluster_dist = nearest(queries, centers.float())
    inside = cluster_dist <= radii.float()[cluster]

    # Which cluster owns each point, from the CSR offsets (searchsorted: no host sync).
    point_index = torch.arange(points.shape[0], device=points.device)
    point_cluster = torch.searchsorted(point_offsets[1:], point_index, right=True)
    member = point_cluster[None, :] == cluster[:, None]
    point, point_dist = nearest(queries, points.float(), allowed=member)
    found = inside & torch.isfinite(point_dist)
    return torch.where(found, point_blocks[point], -1)


def block_lora(x, A, B, block_ids, scale, base=None):
    """Vectorized :func:`melo_fast.ops.block_lora`: gather each sample's block, two batched GEMMs."""
    if base is None:
        base = x.new_zeros(x.shape[0], x.shape[1], B.shape[2])
    if A.shape[0] == 0:
        return base
    active = block_ids >= 0
    safe_ids = block_ids.clamp(min=0)
    hidden = torch.bmm(x, A[safe_ids].transpose(1, 2))
    delta = torch.bmm(hidden, B[safe_ids])
    # torch.where, not a multiply by the mask: unedited samples get `base` bit for bit even if the
    # unused delta overflowed to inf/nan.
    return torch.where(active[:, None, None], base + scale * delta, base)


class TorchBackend(Backend):
    """The ``torch`` backend: the two functions above."""

    name = "torch"

    def vecdb_search(self, queries, centers, radii, point_offsets, points, point_blocks):
        return vecdb_search(queries, centers, radii, point_offsets, points, point_blocks)

    def block_lora(self, x, A, B, block_ids, scale, base):
        return block_lora(x, A, B, block_ids, scale, base)


_BACKEND = TorchBackend()


def load() -> TorchBackend:
    return _BACKEND
