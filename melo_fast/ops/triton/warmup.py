"""Compile up front every kernel variant a patched model launches, so serving never stalls on one.

Triton compiles a kernel variant on its first launch (a noticeable stall each). The launchers keep
the variants few (see ``block_lora.py``, "Compiled variants"): per layer shape and dtype, one per
token-tile bucket and mode; per key size, one per query-tile bucket. :func:`warmup` runs one tiny
call per bucket and mode through the same launchers, so the first decode step or the first insert
that grows the database finds its variants compiled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from melo_fast.ops.triton.block_lora import block_lora_bwd, block_lora_fwd
from melo_fast.ops.triton.vecdb_search import vecdb_search_fwd

# One token count and one query count per tile bucket of the launchers (decode-sized, and larger;
# tests/test_ops_triton_launch.py checks that they cover every bucket).
TOKEN_COUNTS = (1, 17)
QUERY_COUNTS = (1, 17)


def warmup(
    device: torch.device,
    lora_shapes: Iterable[tuple[int, int, int]] = (),
    key_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    key_dtype: torch.dtype = torch.float32,
    training: bool = True,
) -> int:
    """Run one tiny call per compiled variant on ``device`` (see :func:`melo_fast.ops.warmup`).

    Returns:
        The number of calls made.
    """
    calls = 0
    for d_in, d_out, k in sorted(set(lora_shapes)):
        A = torch.zeros(1, k, d_in, dtype=dtype, device=device)
        B = torch.zeros(1, k, d_out, dtype=dtype, device=device)
        ids = torch.zeros(1, dtype=torch.int64, device=device)
        for t in TOKEN_COUNTS:
            x = torch.zeros(1, t, d_in, dtype=dtype, device=device)
            base = torch.zeros(1, t, d_out, dtype=dtype, device=device)
            block_lora_fwd(x, A, B, ids, 1.0, base, inplace=True)  # inference: added into the layer's output
            out, h = block_lora_fwd(x, A, B, ids, 1.0, base, store_h=training)  # out of place (grad mode)
            calls += 2
            if training:
                block_lora_bwd(torch.zeros_like(out), x, A, B, ids, 1.0, h)
                calls += 1
    if key_dim is not None:
        centers = torch.zeros(2, key_dim, dtype=key_dtype, device=device)
        radii = torch.ones(2, device=device)
        offsets = torch.arange(3, device=device)
        blocks = torch.arange(2, device=device)
        for q in QUERY_COUNTS:
            queries = torch.zeros(q, key_dim, dtype=key_dtype, device=device)
            vecdb_search_fwd(queries, centers, radii, offsets, centers, blocks)
            calls += 1
    return calls
