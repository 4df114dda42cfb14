"""Fused vector-database lookup in Triton: nearest center → radius → nearest point's block id.

Two kernels, no ``[Q, C]`` distance matrix and no host synchronization:

1. ``_vecdb_search_scan_kernel`` — grid ``(query tiles, center splits)``. Each program streams the
   center tiles of its split once and keeps, per query, the best and second-best center by the
   score ``||c||² − 2 q·c`` (the query's own norm does not change the ranking). Splitting C over
   programs is what makes a 1M-center scan with few queries bandwidth-bound: every SM streams its
   own slice of the centers instead of one program walking all of them.
2. ``_vecdb_search_resolve_kernel`` — grid ``(Q,)``. Reduces the per-split (best, second) pairs in
   split order, re-checks the two survivors with exact fp32 differences (the score above suffers
   cancellation), applies the radius, and scans the chosen cluster's points (CSR) for the nearest
   one. Cluster sizes differ per query, hence one program per query.

Ordering everywhere is lexicographic on (distance, index), so ties go to the lowest index as with
``argmin`` and the reference loop's strict ``<``. Only the scan's two best candidates per query are
re-checked exactly, so the answer equals the reference's unless three or more centers score within the
scan's rounding of the nearest one. fp16/bf16 keys are multiplied on tensor cores (exact products,
fp32 accumulation). fp32 keys are multiplied in TF32x3 on a GPU: each operand is split into a TF32
part and a TF32 remainder and three tensor-core products are summed, which drops only the product of
the remainders (about 2⁻²² relative, against 2⁻²⁴ for IEEE fp32 and 2⁻¹¹ for plain TF32, which would
reorder genuinely close centers) at a third of the cost of IEEE FMA dots (``benchmarks/gpu_tune.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from melo_fast.ops import torch_ops
from melo_fast.ops.triton._launch import gpu_tiles, interpreting, launch, sm_count, use_torch_for_fp64

# The Triton interpreter (3.9) multiplies the raw uint16 bits of bf16 operands in tl.dot, so under
# the interpreter 16-bit keys take the fp32 dot path (numerically what the GPU's 16-bit dot does:
# exact products, fp32 accumulation).
_INTERPRET = interpreting(triton)
_UPCAST_DOT = _INTERPRET

# Sentinel index for "no candidate": larger than any real center index (C < 2**31).
_NO_INDEX = tl.constexpr(2**31 - 1)
_INF = tl.constexpr(float("inf"))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _lex_less(a_score, a_index, b_score, b_index):
    """(a_score, a_index) < (b_score, b_index) lexicographically: ties go to the lower index."""
    return (a_score < b_score) | ((a_score == b_score) & (a_index < b_index))


@triton.jit
def _top2_along(score, index, AXIS: tl.constexpr):
    """Best and second-best (score, index) along ``AXIS``; lowest index wins ties."""
    best_score = tl.min(score, axis=AXIS)
    best_index = tl.min(tl.where(score == tl.expand_dims(best_score, AXIS), index, _NO_INDEX), axis=AXIS)
    is_best = index == tl.expand_dims(best_index, AXIS)
    rest = tl.where(is_best, _INF, score)
    second_score = tl.min(rest, axis=AXIS)
    second_index = tl.min(
        tl.where((rest == tl.expand_dims(second_score, AXIS)) & ~is_best, index, _NO_INDEX), axis=AXIS
    )
    return best_score, best_index, second_score, second_index


@triton.jit
def _merge_top2(a1_score, a1_index, a2_score, a2_index, b1_score, b1_index, b2_score, b2_index):
    """Top two of two sorted pairs (a1 ≤ a2, b1 ≤ b2) with disjoint indices."""
    b_first = _lex_less(b1_score, b1_index, a1_score, a1_index)
    first_score = tl.where(b_first, b1_score, a1_score)
    first_index = tl.where(b_first, b1_index, a1_index)
    # The runner-up is the loser of the heads or the winner's own second.
    x_score = tl.where(b_first, a1_score, b1_score)
    x_index = tl.where(b_first, a1_index, b1_index)
    y_score = tl.where(b_first, b2_score, a2_score)
    y_index = tl.where(b_first, b2_index, a2_index)
    x_wins = _lex_less(x_score, x_index, y_score, y_index)
    second_score = tl.where(x_wins, x_score, y_score)
    second_index = tl.where(x_wins, x_index, y_index)
    return first_score, first_index, second_score, second_index


# Q, C and the split layout change with every batch and every insert: kept out of Triton's integer
# specialization so that they never compile a new variant (see block_lora.py, "Compiled variants").
@triton.jit(do_not_specialize=["Q", "C", "centers_per_split", "n_splits"])
def _vecdb_search_scan_kernel(
    q_ptr,  # [Q, D] queries, row stride stride_q
    c_ptr,  # [C, D] centers, row stride stride_c
    c_sqnorm_ptr,  # [C] fp32 ||c||², read only when HAS_SQNORM
    part_score_ptr,  # [Q, n_splits, 2] fp32 out: best, second score per split
    part_index_ptr,  # [Q, n_splits, 2] int32 out: their center indices
    Q,
    C,
    D,
    stride_q,
    stride_c,
    centers_per_split,
    n_splits,
    HAS_SQNORM: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    q_rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_rows < Q
    # int64 offsets: C * D exceeds 2**31 for a 1M x 8192 database.
    q_row_offsets = q_rows.to(tl.int64) * stride_q

    c_start = pid_s * centers_per_split
    c_end = tl.minimum(c_start + centers_per_split, C)

    best_score = tl.full([BLOCK_Q], _INF, tl.float32)
    best_index = tl.full([BLOCK_Q], _NO_INDEX, tl.int32)
    second_score = tl.full([BLOCK_Q], _INF, tl.float32)
    second_index = tl.full([BLOCK_Q], _NO_INDEX, tl.int32)

    for c0 in range(c_start, c_end, BLOCK_C):
        c_cols = c0 + tl.arange(0, BLOCK_C)
        c_mask = c_cols < c_end
        c_row_offsets = c_cols.to(tl.int64) * stride_c
        dot = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
        sqnorm = tl.zeros([BLOCK_C], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_offs = d0 + tl.arange(0, BLOCK_D)
            d_mask = d_offs < D
            q = tl.load(
                q_ptr + q_row_offsets[:, None] + d_offs[None, :], mask=q_mask[:, None] & d_mask[None, :], other=0.0
            )
            # Loaded as [BLOCK_D, BLOCK_C] so the dot needs no transpose.
            c = tl.load(
                c_ptr + c_row_offsets[None, :] + d_offs[:, None], mask=c_mask[None, :] & d_mask[:, None], other=0.0
            )
            if not HAS_SQNORM:
                # The tile is already in registers: its norm costs no extra memory traffic.
                c32 = c.to(tl.float32)
                sqnorm += tl.sum(c32 * c32, axis=0)
            if DOT_FP32:
                # fp32 keys (or mixed dtypes): TF32x3 on a GPU, IEEE in the interpreter (scan_config).
                dot = tl.dot(q.to(tl.float32), c.to(tl.float32), dot, input_precision=DOT_PRECISION)
            else:
                # fp16/bf16 products are exact in fp32 and accumulate in fp32.
                dot = tl.dot(q, c, dot)
        if HAS_SQNORM:
            sqnorm = tl.load(c_sqnorm_ptr + c_cols, mask=c_mask, other=0.0)
        score = sqnorm[None, :] - 2.0 * dot
        valid = c_mask[None, :] & (score == score)  # NaN never wins, as in the reference's `<`
        score = tl.where(valid, score, _INF)
        index = tl.where(c_mask, c_cols, _NO_INDEX)
        index = tl.broadcast_to(index[None, :], [BLOCK_Q, BLOCK_C])
        t1_score, t1_index, t2_score, t2_index = _top2_along(score, index, 1)
        best_score, best_index, second_score, second_index = _merge_top2(
            best_score, best_index, second_score, second_index, t1_score, t1_index, t2_score, t2_index
        )

    part = (q_rows.to(tl.int64) * n_splits + pid_s) * 2
    tl.store(part_score_ptr + part, best_score, mask=q_mask)
    tl.store(part_index_ptr + part, best_index, mask=q_mask)
    tl.store(part_score_ptr + part + 1, second_score, mask=q_mask)
    tl.store(part_index_ptr + part + 1, second_index, mask=q_mask)


@triton.jit(do_not_specialize=["C", "n_splits"])
def _vecdb_search_resolve_kernel(
    q_ptr,  # [Q, D] queries
    c_ptr,  # [C, D] centers
    radii_ptr,  # [C] radii
    offsets_ptr,  # [C + 1] int64 CSR offsets of the points
    p_ptr,  # [P, D] points grouped by cluster
    p_block_ptr,  # [P] int64 block id per point
    part_score_ptr,  # [Q, n_splits, 2] fp32 from the scan kernel
    part_index_ptr,  # [Q, n_splits, 2] int32 from the scan kernel
    out_ptr,  # [Q] int64 block ids
    C,
    D,
    stride_q,
    stride_c,
    stride_p,
    n_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    q_base = q_ptr + pid.to(tl.int64) * stride_q

    # 1) Reduce the splits' (best, second) pairs; fixed order, so the result is deterministic.
    best_score = tl.full([], _INF, tl.float32)
    best_index = tl.full([], _NO_INDEX, tl.int32)
    second_score = tl.full([], _INF, tl.float32)
    second_index = tl.full([], _NO_INDEX, tl.int32)
    n_parts = 2 * n_splits
    part_base = pid.to(tl.int64) * n_parts
    for s0 in range(0, n_parts, BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        s_mask = s_offs < n_parts
        score = tl.load(part_score_ptr + part_base + s_offs, mask=s_mask, other=_INF)
        index = tl.load(part_index_ptr + part_base + s_offs, mask=s_mask, other=_NO_INDEX)
        t1_score, t1_index, t2_score, t2_index = _top2_along(score, index, 0)
        best_score, best_index, second_score, second_index = _merge_top2(
            best_score, best_index, second_score, second_index, t1_score, t1_index, t2_score, t2_index
        )

    # 2) Exact fp32 re-check of both candidates: the score above cancels badly when ||c||² is large.
    first_ok = best_index < C
    second_ok = second_index < C
    first_base = c_ptr + best_index.to(tl.int64) * stride_c
    second_base = c_ptr + second_index.to(tl.int64) * stride_c
    # A missing candidate loads nothing: its column bound drops to 0 (a scalar-bound mask).
    d_end1 = tl.where(first_ok, D, 0)
    d_end2 = tl.where(second_ok, D, 0)
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_base + d_offs, mask=d_offs < D, other=0.0).to(tl.float32)
        c1 = tl.load(first_base + d_offs, mask=d_offs < d_end1, other=0.0).to(tl.float32)
        c2 = tl.load(second_base + d_offs, mask=d_offs < d_end2, other=0.0).to(tl.float32)
        acc1 += (q - c1) * (q - c1)
        acc2 += (q - c2) * (q - c2)
    # Compare correctly rounded Euclidean distances, like the reference: two different squared
    # sums can round to the same distance, and then the lower index must win.
    dist1 = tl.sqrt_rn(tl.sum(acc1, axis=0))
    dist2 = tl.sqrt_rn(tl.sum(acc2, axis=0))
    dist1 = tl.where(first_ok & (dist1 == dist1), dist1, _INF)
    dist2 = tl.where(second_ok & (dist2 == dist2), dist2, _INF)
    take_second = _lex_less(dist2, second_index, dist1, best_index)
    cluster = tl.where(take_second, second_index, best_index)
    cluster_dist = tl.where(take_second, dist2, dist1)
    found = cluster_dist < _INF

    # 3) Radius: the reference rejects only `dist > radius`.
    radius = tl.load(radii_ptr + cluster, mask=found, other=0.0).to(tl.float32)
    inside = found & tl.where(cluster_dist > radius, False, True)

    # 4) Nearest point of the cluster; an empty range (miss or empty cluster) skips the loop.
    p_start = tl.load(offsets_ptr + cluster, mask=inside, other=0)
    p_end = tl.load(offsets_ptr + cluster + 1, mask=inside, other=0)
    p_end = tl.where(inside, p_end, p_start)
    best_p_dist = tl.full([], _INF, tl.float32)
    best_p = tl.full([], -1, tl.int64)
    for p0 in range(p_start, p_end, BLOCK_P):
        p_offs = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_mask = p_offs < p_end
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_offs = d0 + tl.arange(0, BLOCK_D)
            d_mask = d_offs < D
            q = tl.load(q_base + d_offs, mask=d_mask, other=0.0).to(tl.float32)
            p = tl.load(
                p_ptr + p_offs[:, None] * stride_p + d_offs[None, :],
                mask=p_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            diff = q[None, :] - p
            acc += diff * diff
        dist = tl.sqrt_rn(tl.sum(acc, axis=1))
        dist = tl.where(p_mask & (dist == dist), dist, _INF)
        tile_dist = tl.min(dist, axis=0)
        tile_p = tl.min(tl.where(dist == tile_dist, p_offs, 2**62), axis=0)
        # Tiles go up in index, so strict `<` keeps the lowest index on ties across tiles.
        better = tile_dist < best_p_dist
        best_p = tl.where(better, tile_p, best_p)
        best_p_dist = tl.where(better, tile_dist, best_p_dist)

    has_point = best_p >= 0
    block = tl.load(p_block_ptr + best_p, mask=has_point, other=-1)
    tl.store(out_ptr + pid, tl.where(has_point, block, -1))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _target_programs(device: torch.device) -> int:
    """How many scan programs to aim for: a few waves on a GPU; very few in the CPU interpreter."""
    if gpu_tiles(device):
        return 4 * sm_count(device)
    return 2  # interpreter: every program instance costs milliseconds


# GPU tile sizes, from benchmarks/gpu_tune.py on an H200 (benchmarks/gpu/gpu_tune.json; C = 1M, d = 768):
# fp32 keys multiply in TF32x3 (three TF32 tensor-core products per pair, about fp32 accuracy; see the
# module docstring). With up to 16 queries, 256-center tiles read the centers fastest: 1.44 ms against
# 3.84 ms for IEEE FMA dots. With 32 queries the three dots need more registers than one, and ptxas
# 13.4 spills the faster tiles tried (64 x 64 in 4 warps: 1.94 ms; 256 x 32), so the 32-query tile is
# the fastest measured one that spills nothing: 128 x 32 in 8 warps, 2.57 ms against 7.14 ms.
# 16-bit keys ran within 10% of each other over every tile tried, at ~2.3x the HBM floor.
# `benchmarks/gpu_check.py --only compile` prints the ptxas report of every variant. The interpreter
# prefers few, large tiles (its cost is per operation, not per element).


def scan_config(n_queries: int, n_centers: int, dim: int, dot_fp32: bool, on_gpu: bool) -> dict:
    """Constexprs and launch options of ``_vecdb_search_scan_kernel``.

    Two variants per key dtype and key size on a GPU (up to 16 queries, or more), whatever C and Q.
    """
    block_q = 16 if n_queries <= 16 else 32
    if on_gpu:
        if dot_fp32:
            if block_q == 16:
                return dict(BLOCK_Q=16, BLOCK_C=256, BLOCK_D=32, num_warps=8, num_stages=3, DOT_PRECISION="tf32x3")
            return dict(BLOCK_Q=32, BLOCK_C=128, BLOCK_D=32, num_warps=8, num_stages=3, DOT_PRECISION="tf32x3")
        return dict(BLOCK_Q=block_q, BLOCK_C=128, BLOCK_D=32, num_warps=8, num_stages=3, DOT_PRECISION="ieee")
    return dict(
        BLOCK_Q=block_q,
        BLOCK_C=min(64, max(16, triton.next_power_of_2(n_centers))),
        BLOCK_D=min(128, max(16, triton.next_power_of_2(dim))),
        DOT_PRECISION="ieee",
    )


def resolve_config(dim: int, on_gpu: bool) -> dict:
    """Constexprs and launch options of ``_vecdb_search_resolve_kernel``: fixed per key size.

    ``BLOCK_S`` (split results reduced per loop step) is fixed rather than sized to the number of
    splits, so a growing database never compiles a new variant.
    """
    config = dict(BLOCK_S=128, BLOCK_D=min(256, max(16, triton.next_power_of_2(dim))), BLOCK_P=8)
    if on_gpu:
        config["num_warps"] = 4
    return config


def vecdb_search_fwd(
    queries: torch.Tensor,
    centers: torch.Tensor,
    radii: torch.Tensor,
    point_offsets: torch.Tensor,
    points: torch.Tensor,
    point_blocks: torch.Tensor,
    center_sqnorms: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_c: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Block id per query (see :func:`melo_fast.ops.vecdb_search`); two kernel launches, no host sync.

    Args:
        queries: ``[Q, D]`` fp32/fp16/bf16.
        centers: ``[C, D]`` fp32/fp16/bf16 (C may be 0).
        radii: ``[C]`` float.
        point_offsets: ``[C + 1]`` int64 CSR offsets.
        points: ``[P, D]`` float, grouped by cluster.
        point_blocks: ``[P]`` int64 (-1 allowed).
        center_sqnorms: optional ``[C]`` fp32 ``||c||²`` cached by the caller; computed inside the
            scan kernel from the tiles it already loads otherwise (no extra pass over the centers).
        num_splits, block_c, block_d: tuning overrides (tests use them to exercise every path).

    Returns:
        ``[Q]`` int64 block ids, -1 for "no edit".
    """
    n_queries, dim = queries.shape
    n_centers = centers.shape[0]
    device = queries.device
    if n_queries == 0 or n_centers == 0 or points.shape[0] == 0:
        # Shapes, not values: empty database or no points anywhere → every query misses.
        return torch.full((n_queries,), -1, dtype=torch.int64, device=device)

    queries = queries if queries.stride(-1) == 1 else queries.contiguous()
    centers = centers if centers.stride(-1) == 1 else centers.contiguous()
    points = points if points.stride(-1) == 1 else points.contiguous()
    radii = radii.contiguous()
    point_offsets = point_offsets.contiguous()
    point_blocks = point_blocks.contiguous()

    same_16bit = queries.dtype == centers.dtype and queries.dtype in (torch.float16, torch.bfloat16)
    dot_fp32 = _UPCAST_DOT or not same_16bit
    config = scan_config(n_queries, n_centers, dim, dot_fp32, gpu_tiles(device))
    if block_c is not None:
        config["BLOCK_C"] = block_c
    if block_d is not None:
        config["BLOCK_D"] = block_d
    block_q, block_c = config["BLOCK_Q"], config["BLOCK_C"]
    n_q_tiles = triton.cdiv(n_queries, block_q)
    n_c_tiles = triton.cdiv(n_centers, block_c)
    if num_splits is None:
        num_splits = triton.cdiv(_target_programs(device), n_q_tiles)
    num_splits = max(1, min(num_splits, n_c_tiles))
    tiles_per_split = triton.cdiv(n_c_tiles, num_splits)
    num_splits = triton.cdiv(n_c_tiles, tiles_per_split)
    centers_per_split = tiles_per_split * block_c

    has_sqnorm = center_sqnorms is not None
    if has_sqnorm:
        center_sqnorms = center_sqnorms.to(torch.float32).contiguous()

    part_score = torch.empty((n_queries, num_splits, 2), dtype=torch.float32, device=device)
    part_index = torch.empty((n_queries, num_splits, 2), dtype=torch.int32, device=device)
    launch(
        _vecdb_search_scan_kernel,
        (n_q_tiles, num_splits),
        device,
        queries,
        centers,
        center_sqnorms if has_sqnorm else part_score,  # dummy pointer when unused
        part_score,
        part_index,
        n_queries,
        n_centers,
        dim,
        queries.stride(0),
        centers.stride(0),
        centers_per_split,
        num_splits,
        HAS_SQNORM=has_sqnorm,
        DOT_FP32=dot_fp32,
        **config,
    )

    out = torch.empty((n_queries,), dtype=torch.int64, device=device)
    launch(
        _vecdb_search_resolve_kernel,
        (n_queries,),
        device,
        queries,
        centers,
        radii,
        point_offsets,
        points,
        point_blocks,
        part_score,
        part_index,
        out,
        n_centers,
        dim,
        queries.stride(0),
        centers.stride(0),
        points.stride(0),
        num_splits,
        **resolve_config(dim, gpu_tiles(device)),
    )
    return out


def vecdb_search(queries, centers, radii, point_offsets, points, point_blocks):
    """The op, as the backend runs it for :func:`melo_fast.ops.vecdb_search` (shapes validated there)."""
    if queries.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"triton backend: vecdb_search needs CUDA tensors, got {queries.device} (or set TRITON_INTERPRET=1)"
        )
    if use_torch_for_fp64("vecdb_search", queries, centers, points):
        return torch_ops.vecdb_search(queries, centers, radii, point_offsets, points, point_blocks)
    return vecdb_search_fwd(queries, centers, radii, point_offsets, points, point_blocks)
