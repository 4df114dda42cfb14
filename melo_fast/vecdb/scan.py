"""The scan of the vector database's insert: exact nearest centers, and the centers in reach, in one pass.

An insert needs, for every key of the batch, (1) its nearest cluster center, exactly as the rules
define it (the float32 norm ``torch.linalg.vector_norm(key - center)``, ties to the lowest index),
and (2) the clusters that may hold a stored point within a given distance of it (the re-edit rule
looks for coinciding points; a cluster whose points all lie within ``reach`` of its center can hold
one only if the key is within ``reach + tolerance`` of that center).

Both come from one pass over the centers in column blocks: ``||c||² - 2 q·c`` for a block is one
GEMM (``torch.addmm``, the fastest matrix product of the device; ``||c||²`` is cached by the
database), and a block never grows beyond a fixed number of scores, so no ``[N, C]`` matrix is
formed. Those scores are rounded, so they only *select*: every center whose score is within a
proven rounding bound of the best (or of the reach) becomes a candidate pair, and the candidates are
then measured with the exact norm of the difference. The result is the exact answer, not a usual
one: a near-tie costs a few more exact distances, never a different cluster.

Host synchronization (CUDA): two per column block (``nonzero`` of the rows that select something,
then of their selections); a block holds up to ``2**25`` scores on CUDA (one block for 100 keys
against up to 335k centers), ``2**22`` on CPU (where there is nothing to synchronize and a smaller
block stays in cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = 2.0**-24  # float32
# Relative precision the GEMM may round its fp32 inputs to, by torch.get_float32_matmul_precision().
INPUT_ROUNDING = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}
ROWS_PER_PIECE = 1 << 16  # rows of [rows, d] temporaries of the norms and exact distances


@dataclass
class ScanResult:
    """What :func:`scan` found for ``N`` queries against ``C`` centers.

    Attributes:
        nearest: ``[N]`` int64 index of the nearest center; -1 when there is none (no centers, or all excluded).
        distance: ``[N]`` float32 exact distance to it (``inf`` when there is none).
        pair_queries, pair_centers: ``[K]`` int64, the candidate pairs that were measured exactly.
        pair_within: ``[K]`` bool, the pair's exact distance is at most ``within[center]``. Every
            (query, center) pair at that distance or closer is among the pairs (unless excluded).
    """

    nearest: torch.Tensor
    distance: torch.Tensor
    pair_queries: torch.Tensor
    pair_centers: torch.Tensor
    pair_within: torch.Tensor


def squared_norms(vectors: torch.Tensor) -> torch.Tensor:
    """``[n, d]`` float32 → ``[n]`` float32 ``||v||²`` (in pieces: no ``[n, d]`` temporary)."""
    pieces = [(piece * piece).sum(-1) for piece in vectors.split(ROWS_PER_PIECE)]
    return torch.cat(pieces) if pieces else vectors.new_empty(0)


def exact_distances(a: torch.Tensor, a_rows: torch.Tensor, b: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
    """``[K]`` float32 ``vector_norm(a[a_rows[k]] - b[b_rows[k]])``: the rules' definition of a distance."""
    pieces = [
        torch.linalg.vector_norm(a[i] - b[j], dim=1)
        for i, j in zip(a_rows.split(ROWS_PER_PIECE), b_rows.split(ROWS_PER_PIECE), strict=True)
    ]
    return torch.cat(pieces) if pieces else a.new_empty(0)


def relative_error(dim: int) -> float:
    """Bound on the rounding of a score ``||c||² - 2 q·c`` and of a float32 squared distance, as a
    multiple of ``(||q|| + ||c||)²``.

    The dot products and the norms are float32 sums of ``d`` products in any order (error at most
    ``gamma_d = d u / (1 - d u)`` relative to the sum of magnitudes, which Cauchy-Schwarz bounds by
    the product of the norms), plus the GEMM's input rounding if the matmul precision allows it, plus
    two roundings to combine them; the exact distance it is compared with carries the same ``gamma``.
    Twice that sum, so nothing rests on a tight estimate.
    """
    k = (dim + 4) * UNIT_ROUNDOFF
    gamma = k / (1.0 - k)
    input_rounding = INPUT_ROUNDING.get(torch.get_float32_matmul_precision(), 2.0**-8)
    if torch.backends.cuda.matmul.allow_tf32:
        input_rounding = max(input_rounding, INPUT_ROUNDING["high"])
    return 4.0 * (gamma + 2.0 * input_rounding)


def scan(
    queries: torch.Tensor,
    centers: torch.Tensor,
    center_sq_norms: torch.Tensor,
    within: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
) -> ScanResult:
    """Exact nearest center of every query, and the pairs within ``within[center]`` of it.

    Args:
        queries: ``[N, d]`` float32 keys.
        centers: ``[C, d]`` float32 centers (same device).
        center_sq_norms: ``[C]`` float32, :func:`squared_norms` of ``centers``.
        within: optional ``[C]`` float32 distance per center (``-inf``: never); pairs at most this far
            apart are reported in ``pair_within``.
        excluded: optional ``[C]`` bool: centers that take no part (neither nearest nor in a pair).
    """
    n, dim = queries.shape
    count = centers.shape[0]
    device = queries.device
    inf = torch.full((), math.inf, device=device)  # made on the device: no host-to-device copy
    if n == 0 or count == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return ScanResult(
            torch.full((n,), -1, dtype=torch.int64, device=device),
            torch.full((n,), math.inf, device=device),
            empty,
            empty,
            torch.empty(0, dtype=torch.bool, device=device),
        )
    relative = relative_error(dim)
    query_sq = squared_norms(queries)
    query_norm = query_sq.sqrt() * (1 + 4 * relative)
    # One error bound per query, from the largest center norm: the bound of every score of the row.
    error = relative * (query_norm + center_sq_norms.max().sqrt()).square()  # [N]
    # Squared reach, widened by the rounding of a float32 distance (a pair measured at exactly
    # `within` may be a little farther apart in exact arithmetic).
    within_sq = None if within is None else torch.where(within >= 0, within.square() * (1 + relative), -inf)
    budget = 1 << (25 if device.type == "cuda" else 22)
    width = max(256, budget // n)
    best_upper = torch.full((n,), math.inf, device=device)  # running min over centers of (score + error)
    found_q, found_c, found_score = [], [], []
    for start in range(0, count, width):
        stop = min(count, start + width)
        scores = torch.addmm(center_sq_norms[start:stop], queries, centers[start:stop].T, alpha=-2.0)
        if excluded is not None:
            scores.masked_fill_(excluded[start:stop][None, :], math.inf)
        lowest = scores.amin(dim=1)
        best_upper = torch.minimum(best_upper, lowest + error)
        # A center can be the nearest only if its lowest possible score is below the best highest one;
        # it can be in reach only below the block's largest reach. One comparison per score selects
        # both (a superset, sorted out exactly below): most blocks select just each query's best.
        threshold = best_upper + error
        if within_sq is not None:
            threshold = torch.maximum(threshold, within_sq[start:stop].max() - query_sq + error)
        # Only the rows whose block minimum passes can select anything: in the later blocks, few.
        rows = (lowest <= threshold).nonzero()[:, 0]  # host synchronization (CUDA)
        if rows.numel() == 0:
            continue
        few = 4 * rows.numel() < n  # then comparing a copy of those rows beats comparing all
        selected = scores[rows] <= threshold[rows, None] if few else scores <= threshold[:, None]
        if excluded is not None:
            selected &= ~excluded[None, start:stop]  # inf <= inf while no allowed center was seen yet
        r, c = selected.nonzero().unbind(1)  # host synchronization (CUDA)
        q = rows[r] if few else r
        found_q.append(q)
        found_c.append(c + start)
        found_score.append(scores[q, c])
    empty = torch.empty(0, dtype=torch.int64, device=device)
    pair_q, pair_c = torch.cat([empty, *found_q]), torch.cat([empty, *found_c])
    score = torch.cat([queries.new_empty(0), *found_score])
    distance = exact_distances(queries, pair_q, centers, pair_c)
    # Earlier blocks were selected against a higher running bound: filter with the final one.
    candidate = score <= best_upper[pair_q] + error[pair_q]
    candidate_distance = torch.where(candidate, distance, inf)
    best = torch.full((n,), math.inf, device=device).scatter_reduce(0, pair_q, candidate_distance, "amin")
    tied = candidate & (candidate_distance == best[pair_q])
    lowest = torch.full((n,), count, dtype=torch.int64, device=device)
    lowest = lowest.scatter_reduce(0, pair_q, torch.where(tied, pair_c, count), "amin")
    nearest = torch.where(lowest == count, -1, lowest)
    pair_within = torch.zeros_like(candidate) if within is None else distance <= within[pair_c]
    return ScanResult(nearest, best, pair_q, pair_c, pair_within)
