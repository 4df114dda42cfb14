"""Masked rank-slice LoRA in Triton: ``out = base + scale * (x @ A[b].T) @ B[b]`` per sample.

The bank is block-major (``A[n_blocks, k, d_in]``, ``B[n_blocks, k, d_out]``); each program reads
its sample's block id and indexes the bank directly, so there is no gathered copy of A/B and no
per-sample Python loop. A sample with block -1 gets ``base`` bit for bit (or zeros). In place
(inference), ``out`` is ``base``: programs of block -1 exit without touching memory and the others
read-modify-write their tile, so no output is allocated.

The rank ``k`` is tiny (1–8 in MELO's settings) but ``tl.dot`` needs every dimension ≥ 16 on a
GPU, so ``k`` is padded to ``BLOCK_K = max(16, next_pow2(k))`` with masked (zero) loads; the padding
contributes exact zeros.

Backward (training one block), all deterministic (no atomics):
- ``_block_lora_bwd_dh_kernel``: ``dh = scale * grad_out @ B[b].T`` per (sample, token tile).
- ``_block_lora_bwd_dx_kernel``: ``grad_x = dh @ A[b]`` per (sample, token tile, d_in tile).
- ``_block_lora_bwd_dw_kernel``: one program per (block, column tile) walks the samples in order
  and sums ``lhs_n.T @ rhs_n`` over the samples routed to that block: ``dA = Σ dh.T @ x``,
  ``dB = scale * Σ h.T @ grad_out``. Blocks absent from the batch get exact zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from melo_fast.ops.triton import _interpreting

# The Triton interpreter (3.9) multiplies the raw uint16 bits of bf16 operands in tl.dot; under the
# interpreter the operands are therefore upcast to fp32 first, which is what the GPU computes anyway
# for 16-bit inputs (exact products, fp32 accumulation).
_INTERPRET = _interpreting(triton)
_UPCAST_DOT = _INTERPRET

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (see ``_UPCAST_DOT`` for the interpreter case)."""
    if UPCAST_DOT:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _block_lora_fwd_kernel(
    x_ptr,  # [N, T, D_IN] contiguous
    a_ptr,  # [N_BLOCKS, K, D_IN] contiguous
    b_ptr,  # [N_BLOCKS, K, D_OUT] contiguous
    ids_ptr,  # [N] int64 block id per sample
    base_ptr,  # [N, T, D_OUT] contiguous, read only when HAS_BASE
    out_ptr,  # [N, T, D_OUT] contiguous; base_ptr itself when INPLACE
    h_ptr,  # [N, T, BLOCK_K] fp32 out (x @ A[b].T for backward), written only when STORE_H
    scale,
    T,
    D_IN,
    D_OUT,
    K,
    N_BLOCKS,
    HAS_BASE: tl.constexpr,
    INPLACE: tl.constexpr,
    STORE_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_o = tl.program_id(2)
    block = tl.load(ids_ptr + pid_n)
    # Out-of-range ids are treated like -1 rather than reading outside the bank.
    active = (block >= 0) & (block < N_BLOCKS)

    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    row_mask = rows < T
    col_mask = cols < D_OUT
    tile_mask = row_mask[:, None] & col_mask[None, :]
    sample = pid_n.to(tl.int64)
    out_offsets = (sample * T + rows[:, None]) * D_OUT + cols[None, :]

    if active:
        ks = tl.arange(0, BLOCK_K)
        k_mask = ks < K
        bank = block.to(tl.int64) * K
        # h = x_tile @ A_b.T, padded to BLOCK_K columns (masked rows of A load as zeros).
        h = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for i0 in range(0, D_IN, BLOCK_I):
            i_offs = i0 + tl.arange(0, BLOCK_I)
            i_mask = i_offs < D_IN
            x = tl.load(
                x_ptr + (sample * T + rows[:, None]) * D_IN + i_offs[None, :],
                mask=row_mask[:, None] & i_mask[None, :],
                other=0.0,
            )
            a_t = tl.load(  # A_b.T tile, [BLOCK_I, BLOCK_K]
                a_ptr + (bank + ks[None, :]) * D_IN + i_offs[:, None],
                mask=i_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            h = _mma(x, a_t, h, DOT_PRECISION, UPCAST_DOT)
        if STORE_H:
            if pid_o == 0:  # one d_out tile per token tile saves h for the backward pass
                tl.store(
                    h_ptr + (sample * T + rows[:, None]) * BLOCK_K + ks[None, :],
                    h,
                    mask=row_mask[:, None],
                )
        b = tl.load(
            b_ptr + (bank + ks[:, None]) * D_OUT + cols[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        # 16-bit inputs: round h like the framework would and use the tensor cores; fp32 stays IEEE.
        delta = _mma(h.to(b.dtype), b, tl.zeros([BLOCK_T, BLOCK_O], tl.float32), DOT_PRECISION, UPCAST_DOT)
        y = scale * delta
        if HAS_BASE:  # in place, this program reads its own tile of base before writing it
            y += tl.load(base_ptr + out_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=tile_mask)
    elif not INPLACE:  # in place, an unedited sample's tile is already right: touch nothing
        # Unedited sample: copy base untouched (bit for bit), no LoRA work at all.
        if HAS_BASE:
            base = tl.load(base_ptr + out_offsets, mask=tile_mask, other=0.0)
            tl.store(out_ptr + out_offsets, base.to(out_ptr.dtype.element_ty), mask=tile_mask)
        else:
            tl.store(out_ptr + out_offsets, tl.zeros([BLOCK_T, BLOCK_O], out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _block_lora_bwd_dh_kernel(
    g_ptr,  # [N, T, D_OUT] contiguous grad_out
    b_ptr,  # [N_BLOCKS, K, D_OUT] contiguous
    ids_ptr,  # [N] int64
    dh_ptr,  # [N, T, BLOCK_K] fp32 out: scale * grad_out @ B_b.T (0 for unedited samples)
    scale,
    T,
    D_OUT,
    K,
    N_BLOCKS,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    block = tl.load(ids_ptr + pid_n)
    active = (block >= 0) & (block < N_BLOCKS)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    ks = tl.arange(0, BLOCK_K)
    sample = pid_n.to(tl.int64)
    dh = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    if active:
        bank = block.to(tl.int64) * K
        for o0 in range(0, D_OUT, BLOCK_O):
            o_offs = o0 + tl.arange(0, BLOCK_O)
            o_mask = o_offs < D_OUT
            g = tl.load(
                g_ptr + (sample * T + rows[:, None]) * D_OUT + o_offs[None, :],
                mask=row_mask[:, None] & o_mask[None, :],
                other=0.0,
            )
            b_t = tl.load(  # B_b.T tile, [BLOCK_O, BLOCK_K]
                b_ptr + (bank + ks[None, :]) * D_OUT + o_offs[:, None],
                mask=o_mask[:, None] & (ks[None, :] < K),
                other=0.0,
            )
            dh = _mma(g.to(b_t.dtype), b_t, dh, DOT_PRECISION, UPCAST_DOT)
        dh = dh * scale
    tl.store(dh_ptr + (sample * T + rows[:, None]) * BLOCK_K + ks[None, :], dh, mask=row_mask[:, None])


@triton.jit
def _block_lora_bwd_dx_kernel(
    dh_ptr,  # [N, T, BLOCK_K] fp32
    a_ptr,  # [N_BLOCKS, K, D_IN] contiguous
    ids_ptr,  # [N] int64
    dx_ptr,  # [N, T, D_IN] out, x's dtype
    T,
    D_IN,
    K,
    N_BLOCKS,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_i = tl.program_id(2)
    block = tl.load(ids_ptr + pid_n)
    active = (block >= 0) & (block < N_BLOCKS)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < T
    col_mask = cols < D_IN
    sample = pid_n.to(tl.int64)
    dx = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
    if active:
        ks = tl.arange(0, BLOCK_K)
        dh = tl.load(dh_ptr + (sample * T + rows[:, None]) * BLOCK_K + ks[None, :], mask=row_mask[:, None], other=0.0)
        a = tl.load(
            a_ptr + (block.to(tl.int64) * K + ks[:, None]) * D_IN + cols[None, :],
            mask=(ks[:, None] < K) & col_mask[None, :],
            other=0.0,
        )
        dx = _mma(dh.to(a.dtype), a, dx, DOT_PRECISION, UPCAST_DOT)
    # Unedited samples get exactly zero gradient from the LoRA path.
    tl.store(
        dx_ptr + (sample * T + rows[:, None]) * D_IN + cols[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _block_lora_bwd_dw_kernel(
    lhs_ptr,  # [N, T, BLOCK_K] fp32: dh (for dA) or h (for dB)
    rhs_ptr,  # [N, T, D] contiguous: x (for dA) or grad_out (for dB)
    ids_ptr,  # [N] int64
    dw_ptr,  # [N_BLOCKS, K, D] out: factor * Σ_{n: ids[n] == block} lhs_n.T @ rhs_n
    factor,
    N,
    T,
    D,
    K,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns one (block, column tile) and sums the samples in index order: the result
    # is deterministic without atomics, and blocks absent from the batch are written as zeros.
    block = tl.program_id(0)
    pid_d = tl.program_id(1)
    ks = tl.arange(0, BLOCK_K)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        # One vector load tells whether this chunk of samples touches the block at all, so the
        # programs of absent blocks skip the batch without a serial scan of the ids.
        n_offs = n0 + tl.arange(0, BLOCK_N)
        chunk = tl.load(ids_ptr + n_offs, mask=n_offs < N, other=-1)
        if tl.sum((chunk == block).to(tl.int32), axis=0) > 0:
            for n in range(n0, tl.minimum(n0 + BLOCK_N, N)):
                if tl.load(ids_ptr + n) == block:
                    sample = tl.full([], n, tl.int64)
                    for t0 in range(0, T, BLOCK_T):
                        rows = t0 + tl.arange(0, BLOCK_T)
                        row_mask = rows < T
                        lhs_t = tl.load(  # lhs_n.T tile, [BLOCK_K, BLOCK_T]
                            lhs_ptr + (sample * T + rows[None, :]) * BLOCK_K + ks[:, None],
                            mask=row_mask[None, :],
                            other=0.0,
                        )
                        rhs = tl.load(
                            rhs_ptr + (sample * T + rows[:, None]) * D + cols[None, :],
                            mask=row_mask[:, None] & col_mask[None, :],
                            other=0.0,
                        )
                        acc = _mma(lhs_t.to(rhs.dtype), rhs, acc, DOT_PRECISION, UPCAST_DOT)
    acc = acc * factor
    tl.store(
        dw_ptr + (block.to(tl.int64) * K + ks[:, None]) * D + cols[None, :],
        acc.to(dw_ptr.dtype.element_ty),
        mask=(ks[:, None] < K) & col_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 stays IEEE so results match the fp32 reference to ~1e-5 (TF32 would not); the option
    # is ignored for fp16/bf16 operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_sizes(x: torch.Tensor, k: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_K): token tile and the rank padded for tl.dot (every dim ≥ 16)."""
    block_t = min(64, max(16, triton.next_power_of_2(x.shape[1])))
    block_k = max(16, triton.next_power_of_2(max(k, 1)))
    return block_t, block_k


def _tile(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def block_lora_fwd(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    base: torch.Tensor | None = None,
    store_h: bool = False,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward pass: ``(out, h)``.

    Args:
        x: ``[N, T, d_in]`` fp32/fp16/bf16.
        A: ``[n_blocks, k, d_in]``, B: ``[n_blocks, k, d_out]``, x's dtype.
        block_ids: ``[N]`` int64; -1 (or out of range) → base.
        scale: Python float.
        base: optional ``[N, T, d_out]`` in x's dtype (the dispatcher checks it).
        store_h: also return ``h = x @ A[b].T`` as fp32 ``[N, T, BLOCK_K]`` (padded rank) for
            the backward pass; rows of unedited samples are left unwritten.
        inplace: write into ``base`` (which must be given and contiguous) and return it as ``out``;
            tiles of unedited samples are not touched. No autograd here: the caller checks that.

    Returns:
        ``out`` ``[N, T, d_out]`` in x's dtype, and ``h`` or None.
    """
    n, t, d_in = x.shape
    n_blocks, k, d_out = B.shape
    if inplace:
        if base is None or not base.is_contiguous():
            raise ValueError("block_lora_fwd: inplace=True needs a contiguous base to write into")
        out = base
    else:
        out = torch.empty((n, t, d_out), dtype=x.dtype, device=x.device)
    block_t, block_k = _block_sizes(x, k)
    h = torch.empty((n, t, block_k), dtype=torch.float32, device=x.device) if store_h else None
    if out.numel() == 0:
        return out, h
    x, A, B, block_ids = x.contiguous(), A.contiguous(), B.contiguous(), block_ids.contiguous()
    base = base.contiguous() if base is not None else None
    on_gpu = x.device.type == "cuda"
    # GPU: [64 tokens] x [128 outputs] tiles over 32-wide d_in steps, 8 warps; fp32 (IEEE FMA dots)
    # needs 32-token tiles. Neither spills registers on sm_90 (checked with ptxas for k ≤ 32).
    # Interpreter: few large tiles (its cost is per operation, not per element).
    if on_gpu and x.dtype == torch.float32:
        block_t = min(block_t, 32)
    block_o = _tile(d_out, 128 if on_gpu else 256)
    block_i = _tile(d_in, 32 if on_gpu else 256)
    grid = (n, triton.cdiv(t, block_t), triton.cdiv(d_out, block_o))
    _block_lora_fwd_kernel[grid](
        x,
        A,
        B,
        block_ids,
        base if base is not None else out,  # dummy pointer when unused
        out,
        h if h is not None else out,  # dummy pointer when unused
        float(scale),
        t,
        d_in,
        d_out,
        k,
        n_blocks,
        HAS_BASE=base is not None,
        INPLACE=inplace,
        STORE_H=h is not None,
        DOT_PRECISION=_dot_precision(x.dtype),
        UPCAST_DOT=_UPCAST_DOT,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_I=block_i,
        BLOCK_O=block_o,
        num_warps=8,
    )
    return out, h


def block_lora_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    h: torch.Tensor | None,
    need_x: bool = True,
    need_a: bool = True,
    need_b: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(grad_x, grad_A, grad_B)`` of :func:`block_lora_fwd` (None where not needed).

    Args:
        grad_out: ``[N, T, d_out]``.
        x, A, B, block_ids, scale: the forward inputs.
        h: fp32 ``[N, T, BLOCK_K]`` saved by the forward (``store_h=True``); required for grad_B.

    Returns:
        ``grad_x`` ``[N, T, d_in]`` (x's dtype, 0 for unedited samples), ``grad_A``
        ``[n_blocks, k, d_in]`` and ``grad_B`` ``[n_blocks, k, d_out]`` (A's dtype; 0 for blocks
        absent from the batch).
    """
    n, t, d_in = x.shape
    n_blocks, k, d_out = B.shape
    device = x.device
    block_t, block_k = _block_sizes(x, k)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    grad_a = torch.empty((n_blocks, k, d_in), dtype=A.dtype, device=device) if need_a else None
    grad_b = torch.empty((n_blocks, k, d_out), dtype=B.dtype, device=device) if need_b else None
    if n * t == 0 or k == 0:
        # Nothing flows back: every gradient is zero (shape test only, no host sync).
        return tuple(g.zero_() if g is not None else None for g in (grad_x, grad_a, grad_b))
    grad_out = grad_out.contiguous()
    x, A, B, block_ids = x.contiguous(), A.contiguous(), B.contiguous(), block_ids.contiguous()
    on_gpu = device.type == "cuda"
    precision = _dot_precision(x.dtype)
    n_t_tiles = triton.cdiv(t, block_t)
    # GPU tile sizes keep every kernel free of register spills on sm_90 (checked with ptxas).
    block_o = _tile(d_out, 128 if on_gpu else 256)
    block_i = _tile(d_in, 128 if on_gpu else 256)
    dh_block_o = _tile(d_out, (32 if x.dtype == torch.float32 else 64) if on_gpu else 256)

    if need_x or need_a:
        dh = torch.empty((n, t, block_k), dtype=torch.float32, device=device)
        _block_lora_bwd_dh_kernel[(n, n_t_tiles)](
            grad_out,
            B,
            block_ids,
            dh,
            float(scale),
            t,
            d_out,
            k,
            n_blocks,
            DOT_PRECISION=precision,
            UPCAST_DOT=_UPCAST_DOT,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            BLOCK_O=dh_block_o,
            num_warps=4,
        )
    if need_x:
        _block_lora_bwd_dx_kernel[(n, n_t_tiles, triton.cdiv(d_in, block_i))](
            dh,
            A,
            block_ids,
            grad_x,
            t,
            d_in,
            k,
            n_blocks,
            DOT_PRECISION=precision,
            UPCAST_DOT=_UPCAST_DOT,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            BLOCK_I=block_i,
            num_warps=8,
        )
    # dA and dB: grid (block, column tile); see _block_lora_bwd_dw_kernel for why this is deterministic.
    if need_a and n_blocks > 0:
        _block_lora_bwd_dw_kernel[(n_blocks, triton.cdiv(d_in, block_i))](
            dh,
            x,
            block_ids,
            grad_a,
            1.0,  # dh already carries the scale
            n,
            t,
            d_in,
            k,
            DOT_PRECISION=precision,
            UPCAST_DOT=_UPCAST_DOT,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            BLOCK_D=block_i,
            BLOCK_N=64,
            num_warps=8,
        )
    if need_b and n_blocks > 0:
        if h is None:
            raise ValueError("block_lora_bwd: grad_B needs the h saved by block_lora_fwd(store_h=True)")
        _block_lora_bwd_dw_kernel[(n_blocks, triton.cdiv(d_out, block_o))](
            h,
            grad_out,
            block_ids,
            grad_b,
            float(scale),
            n,
            t,
            d_out,
            k,
            DOT_PRECISION=_dot_precision(grad_out.dtype),
            UPCAST_DOT=_UPCAST_DOT,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            BLOCK_D=block_o,
            BLOCK_N=64,
            num_warps=8,
        )
    return grad_x, grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class BlockLoRAFunction(torch.autograd.Function):
    """Differentiable ``block_lora`` in x, A, B and base (block_ids and scale are not)."""

    @staticmethod
    def forward(ctx, x, A, B, block_ids, scale, base):
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        out, h = block_lora_fwd(x, A, B, block_ids, scale, base, store_h=need_b)
        ctx.scale = float(scale)
        ctx.base_dtype = base.dtype if base is not None else None
        ctx.save_for_backward(x, A, B, block_ids, h)
        ctx.need = (need_x, need_a, need_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, block_ids, h = ctx.saved_tensors
        need_x, need_a, need_b = ctx.need
        grad_x = grad_a = grad_b = grad_base = None
        if need_x or need_a or need_b:
            grad_x, grad_a, grad_b = block_lora_bwd(
                grad_out, x, A, B, block_ids, ctx.scale, h, need_x=need_x, need_a=need_a, need_b=need_b
            )
        if ctx.needs_input_grad[5]:
            grad_base = grad_out.to(ctx.base_dtype)  # d out / d base is the identity
        return grad_x, grad_a, grad_b, None, None, grad_base


def block_lora(x, A, B, block_ids, scale, base=None):
    """The op, as :func:`melo_fast.ops.block_lora` calls it (shapes validated there)."""
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"triton backend: block_lora needs CUDA tensors, got {x.device} (or set TRITON_INTERPRET=1)")
    return BlockLoRAFunction.apply(x, A, B, block_ids, float(scale), base)


def block_lora_inplace(x, A, B, block_ids, scale, base):
    """The op written into ``base`` (as :func:`melo_fast.ops.block_lora` calls it with ``inplace=True``,
    after checking that no gradient is needed), or None for a non-contiguous ``base`` (the dispatcher
    then computes out of place and copies)."""
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"triton backend: block_lora needs CUDA tensors, got {x.device} (or set TRITON_INTERPRET=1)")
    if not base.is_contiguous():
        return None
    if base.is_inference() and not torch.is_inference_mode_enabled():  # what any in-place torch op refuses
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed.")
    torch.autograd.graph.increment_version(base)  # autograd's record of the in-place write
    return block_lora_fwd(x, A, B, block_ids, scale, base, inplace=True)[0]
