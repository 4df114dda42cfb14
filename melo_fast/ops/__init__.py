"""The two ops, validated, and dispatched to a backend: the ops' public face.

- :func:`vecdb_search`: route keys through the vector database (nearest cluster, radius, nearest point);
- :func:`block_lora`: the per-sample rank-slice LoRA of the patched layers;
- :func:`warmup`: compile the Triton kernel variants up front; :func:`backend_status`: which backends run here.

Every backend implements the two ops with the same semantics (``registry.py``: the protocol and the
name → loader registry; ``BACKENDS``). ``backend=None`` picks the fastest available backend for the
tensors' device. Under ``torch.compile`` the ops are traced, not broken on: the torch backend is plain
torch code, and the compiled kernels are torch custom ops (``custom_ops.py``).
"""

from __future__ import annotations

import torch

from melo_fast.ops.registry import BACKENDS, backend_status, resolve


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _memory_span(tensor: torch.Tensor) -> tuple[int, int]:
    """``[first byte, last byte + 1)`` of the memory ``tensor`` can address (torch strides are ≥ 0)."""
    start = tensor.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` intersect (also for interleaved views, conservatively)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a_start, a_end = _memory_span(a)
    b_start, b_end = _memory_span(b)
    return a_start < b_end and b_start < a_end


def vecdb_search(
    queries: torch.Tensor,
    centers: torch.Tensor,
    radii: torch.Tensor,
    point_offsets: torch.Tensor,
    points: torch.Tensor,
    point_blocks: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Route each query to the block of its edit, or -1 when no edit's scope contains it.

    Args:
        queries: ``[Q, d]`` float (fp32/fp16/bf16) keys to look up.
        centers: ``[C, d]`` float cluster centers (C may be 0: empty database).
        radii: ``[C]`` float cluster radii.
        point_offsets: ``[C + 1]`` int64 CSR offsets: cluster ``c`` owns ``points[o[c]:o[c+1]]``.
        points: ``[P, d]`` float stored keys, grouped by cluster.
        point_blocks: ``[P]`` int64 block id of each point (-1 allowed: a "none" point).
        backend: ``"reference"``, ``"torch"``, ``"cpp"``, ``"triton"`` or None (automatic).

    Returns:
        ``[Q]`` int64 block ids: the nearest center (Euclidean, fp32, ties to the lowest index); -1
        if farther than that cluster's radius; else the block of the nearest point in that cluster.
    """
    _check(queries.dim() == 2, f"vecdb_search: queries must be [Q, d], got shape {tuple(queries.shape)}")
    d = queries.shape[1]
    _check(
        centers.dim() == 2 and centers.shape[1] == d,
        f"vecdb_search: centers must be [C, {d}] to match queries [Q, {d}], got {tuple(centers.shape)}",
    )
    n_clusters = centers.shape[0]
    _check(radii.shape == (n_clusters,), f"vecdb_search: radii must be [{n_clusters}], got {tuple(radii.shape)}")
    _check(
        point_offsets.shape == (n_clusters + 1,) and point_offsets.dtype == torch.int64,
        f"vecdb_search: point_offsets must be int64 [{n_clusters + 1}], got {point_offsets.dtype} "
        f"{tuple(point_offsets.shape)}",
    )
    _check(
        points.dim() == 2 and points.shape[1] == d,
        f"vecdb_search: points must be [P, {d}], got {tuple(points.shape)}",
    )
    _check(
        point_blocks.shape == (points.shape[0],) and point_blocks.dtype == torch.int64,
        f"vecdb_search: point_blocks must be int64 [{points.shape[0]}], got {point_blocks.dtype} "
        f"{tuple(point_blocks.shape)}",
    )
    tensors = (queries, centers, radii, point_offsets, points, point_blocks)
    devices = {t.device for t in tensors}
    _check(len(devices) == 1, f"vecdb_search: all tensors must be on one device, got {sorted(map(str, devices))}")
    return resolve(backend, queries.device).vecdb_search(*tensors)


def block_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    base: torch.Tensor | None = None,
    backend: str | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Per-sample rank-slice LoRA: ``base + scale * (x @ A[b].T) @ B[b]`` with ``b = block_ids[n]``.

    Args:
        x: ``[N, T, d_in]`` input (fp32/fp16/bf16).
        A: ``[n_blocks, k, d_in]`` block-major down projections, same dtype as ``x``.
        B: ``[n_blocks, k, d_out]`` block-major up projections, same dtype as ``x``.
        block_ids: ``[N]`` int64 in ``[-1, n_blocks)``; -1 means "no edit": that sample gets ``base``
            exactly. Larger ids are not checked on the fast paths (that would need a host sync).
        scale: the block's effective scale ``s``.
        base: optional ``[N, T, d_out]`` output of the frozen layer to add to (0 if None).
        backend: ``"reference"``, ``"torch"``, ``"cpp"``, ``"triton"`` or None (automatic).
        inplace: write the result into ``base`` and return it; only allowed when no autograd graph
            is needed (ValueError if ``torch.is_grad_enabled()`` and any of ``x``, ``A``, ``B``,
            ``base`` requires grad) and ``base`` is given. The ``cpp`` and ``triton`` kernels then
            leave the rows of block -1 untouched and update the edited rows in place (no output
            allocation: the inference path of the patched layers); other backends (and a
            non-contiguous ``base``) compute out of place and copy into ``base``, same result.
            ``base`` must not share memory with ``x``, ``A`` or ``B`` (ValueError: a kernel writing
            it while others read the inputs would race).

    Returns:
        ``[N, T, d_out]`` in ``x``'s dtype (``base`` itself when ``inplace``). Differentiable in
        ``x``, ``A``, ``B`` and ``base`` (out of place).
    """
    _check(x.dim() == 3, f"block_lora: x must be [N, T, d_in], got shape {tuple(x.shape)}")
    n, t, d_in = x.shape
    _check(
        A.dim() == 3 and A.shape[2] == d_in,
        f"block_lora: A must be [n_blocks, k, {d_in}] to match x's d_in={d_in}, got {tuple(A.shape)}",
    )
    _check(
        B.dim() == 3 and B.shape[:2] == A.shape[:2],
        f"block_lora: B must be [{A.shape[0]}, {A.shape[1]}, d_out] to match A, got {tuple(B.shape)}",
    )
    _check(
        block_ids.shape == (n,) and block_ids.dtype == torch.int64,
        f"block_lora: block_ids must be int64 [{n}], got {block_ids.dtype} {tuple(block_ids.shape)}",
    )
    _check(
        A.dtype == x.dtype and B.dtype == x.dtype,
        f"block_lora: A ({A.dtype}) and B ({B.dtype}) must have x's dtype ({x.dtype}); cast them first",
    )
    if base is not None:
        _check(
            base.shape == (n, t, B.shape[2]) and base.dtype == x.dtype,
            f"block_lora: base must be {x.dtype} [{n}, {t}, {B.shape[2]}], got {base.dtype} {tuple(base.shape)}",
        )
    tensors = [x, A, B, block_ids] + ([base] if base is not None else [])
    devices = {tensor.device for tensor in tensors}
    _check(len(devices) == 1, f"block_lora: all tensors must be on one device, got {sorted(map(str, devices))}")
    impl = resolve(backend, x.device)
    if not inplace:
        return impl.block_lora(x, A, B, block_ids, float(scale), base)
    _check(base is not None, "block_lora: inplace=True writes into base, but base is None; pass base")
    if torch.is_grad_enabled():
        needs_grad = [name for name, t in zip(("x", "A", "B", "base"), (x, A, B, base), strict=True) if t.requires_grad]
        _check(
            not needs_grad,
            f"block_lora: inplace=True is for inference only, but {', '.join(needs_grad)} requires grad "
            "and grad mode is on; use inplace=False (or run under torch.no_grad())",
        )
    if not torch.compiler.is_compiling():  # a traced graph has no memory yet (its in-place op is declared)
        # A kernel writing base while other programs still read x, A or B from the same memory races.
        aliased = [name for name, t in (("x", x), ("A", A), ("B", B)) if _shares_memory(base, t)]
        _check(
            not aliased,
            f"block_lora: inplace=True writes into base, but base shares memory with {', '.join(aliased)}; "
            "pass a base of its own (e.g. base.clone()) or use inplace=False",
        )
    return impl.block_lora_inplace(x, A, B, block_ids, float(scale), base)


def warmup(
    lora_shapes=(),
    key_dim: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    key_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    training: bool = True,
) -> int:
    """Compile now the Triton kernel variants a patched model will launch (CUDA only; else a no-op).

    The first launch of each variant compiles it (a noticeable stall). The variants are few and
    depend only on the layer shapes and dtypes (not on batch size, tokens, blocks or database size),
    so one call after patching keeps compilation out of serving and editing.

    Args:
        lora_shapes: ``(d_in, d_out, k)`` of each target layer (duplicates are fine).
        key_dim: the router's key size (None: skip the lookup kernels).
        dtype: the target layers' activation dtype; ``key_dtype``: the database's (float32).
        device: the CUDA device the model runs on (default: the current one).
        training: also compile the backward kernels (editing).

    Returns:
        The number of warm-up calls made: 0 without CUDA, without a usable Triton backend, or for
        fp64 (which the Triton backend hands to the torch backend).
    """
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda" or not torch.cuda.is_available() or dtype == torch.float64:
        return 0
    try:
        resolve("triton", device)
    except ImportError:
        return 0
    from melo_fast.ops.triton.warmup import warmup as triton_warmup

    return triton_warmup(device, lora_shapes, key_dim, dtype=dtype, key_dtype=key_dtype, training=training)


__all__ = ["BACKENDS", "backend_status", "block_lora", "resolve", "vecdb_search", "warmup"]
