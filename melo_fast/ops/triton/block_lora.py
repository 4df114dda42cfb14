"""Masked rank-slice LoRA in Triton: ``out = base + scale * (x @ A[b].T) @ B[b]`` per sample.

The bank is block-major (``A[n_blocks, k, d_in]``, ``B[n_blocks, k, d_out]``); each program reads
its sample's block id and indexes the bank directly, so there is no gathered copy of A/B and no
per-sample Python loop. A sample with block -1 gets ``base`` bit for bit (or zeros). In place
(inference), ``out`` is ``base``: programs of block -1 exit without touching memory and the others
read-modify-write their tile, so no output is allocated.

Two kernels do all the work, forward and backward, and a third sums the weight gradients:
- ``_block_lora_project_kernel``: ``h = factor * rows @ bank[b].T``, one program per (sample, token
  tile), looping over the feature dimension. Forward: ``h = x @ A_b.T``; backward:
  ``dh = scale * grad_out @ B_b.T``. Computed once per token tile and kept in fp32 ``[N, T, BLOCK_K]``
  (a few bytes per token), so the wide input is read exactly once, however many output tiles follow.
- ``_block_lora_expand_kernel``: ``out = base + scale * h @ bank[b]``, one program per (sample,
  token tile, output tile). Forward: ``out = base + scale * h @ B_b``; backward: ``grad_x = dh @ A_b``.
- ``_block_lora_bwd_dw_kernel``: one program per (block, column tile) walks the samples in order
  and sums ``lhs_n.T @ rhs_n`` over the samples routed to that block: ``dA = Σ dh.T @ x``,
  ``dB = scale * Σ h.T @ grad_out``. Deterministic (no atomics); blocks absent from the batch get
  exact zeros.

The rank ``k`` is tiny (1–8 in MELO's settings) but ``tl.dot`` needs every dimension ≥ 16 on a
GPU, so ``k`` is padded to ``BLOCK_K = max(16, next_pow2(k))`` with masked (zero) loads; the padding
contributes exact zeros.

Compiled variants: every constexpr takes one of a few values fixed by the layer (dtype, ``k``,
``d_in``, ``d_out``) and, for the token tile, by whether T ≤ 16 (decode) or not; T, the batch size
and the number of blocks are kept out of Triton's integer specialization (``do_not_specialize``).
So a serving process compiles a handful of variants per layer shape once (``warmup.py`` does it up
front), not one more each time the bank grows or a decode step changes T.

fp64 is not compiled here: ``tl.dot`` would accumulate in fp32 and silently lose precision, so
the backend (``__init__.py``) sends fp64 tensors to the ``torch`` backend (logged once; ``_launch.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from melo_fast.ops.triton._launch import gpu_tiles, interpreting, launch

# The Triton interpreter (3.9) multiplies the raw uint16 bits of bf16 operands in tl.dot; under the
# interpreter the operands are therefore upcast to fp32 first, which is what the GPU computes anyway
# for 16-bit inputs (exact products, fp32 accumulation).
_INTERPRET = interpreting(triton)
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


@triton.jit(do_not_specialize=["T", "N_BLOCKS"])
def _block_lora_project_kernel(
    rows_ptr,  # [N, T, D] contiguous: x (forward) or grad_out (backward)
    bank_ptr,  # [N_BLOCKS, K, D] contiguous: A (forward) or B (backward)
    ids_ptr,  # [N] int64 block id per sample
    h_ptr,  # [N, T, BLOCK_K] fp32 out: factor * rows_n @ bank[b_n].T; rows of unedited samples untouched
    factor,
    T,
    D,
    K,
    N_BLOCKS,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    block = tl.load(ids_ptr + pid_n)
    # Out-of-range ids are treated like -1 rather than reading outside the bank.
    if (block >= 0) & (block < N_BLOCKS):
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        ks = tl.arange(0, BLOCK_K)
        sample = pid_n.to(tl.int64)
        bank = block.to(tl.int64) * K
        # Padded to BLOCK_K columns: the masked rows of the bank load as zeros.
        h = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_offs = d0 + tl.arange(0, BLOCK_D)
            d_mask = d_offs < D
            r = tl.load(
                rows_ptr + (sample * T + rows[:, None]) * D + d_offs[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            w_t = tl.load(  # bank[b].T tile, [BLOCK_D, BLOCK_K]
                bank_ptr + (bank + ks[None, :]) * D + d_offs[:, None],
                mask=d_mask[:, None] & (ks[None, :] < K),
                other=0.0,
            )
            h = _mma(r.to(w_t.dtype), w_t, h, DOT_PRECISION, UPCAST_DOT)
        tl.store(h_ptr + (sample * T + rows[:, None]) * BLOCK_K + ks[None, :], h * factor, mask=row_mask[:, None])


@triton.jit(do_not_specialize=["T", "N_BLOCKS"])
def _block_lora_expand_kernel(
    h_ptr,  # [N, T, BLOCK_K] fp32 from the project kernel
    bank_ptr,  # [N_BLOCKS, K, D] contiguous: B (forward) or A (backward, grad_x)
    ids_ptr,  # [N] int64
    base_ptr,  # [N, T, D] contiguous, read only when HAS_BASE
    out_ptr,  # [N, T, D] contiguous; base_ptr itself when INPLACE
    scale,
    T,
    D,
    K,
    N_BLOCKS,
    HAS_BASE: tl.constexpr,
    INPLACE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_d = tl.program_id(2)
    block = tl.load(ids_ptr + pid_n)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < T
    col_mask = cols < D
    tile_mask = row_mask[:, None] & col_mask[None, :]
    sample = pid_n.to(tl.int64)
    out_offsets = (sample * T + rows[:, None]) * D + cols[None, :]

    if (block >= 0) & (block < N_BLOCKS):
        ks = tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + (sample * T + rows[:, None]) * BLOCK_K + ks[None, :], mask=row_mask[:, None], other=0.0)
        w = tl.load(
            bank_ptr + (block.to(tl.int64) * K + ks[:, None]) * D + cols[None, :],
            mask=(ks[:, None] < K) & col_mask[None, :],
            other=0.0,
        )
        # 16-bit inputs: round h like the framework would and use the tensor cores; fp32 stays IEEE.
        delta = _mma(h.to(w.dtype), w, tl.zeros([BLOCK_T, BLOCK_D], tl.float32), DOT_PRECISION, UPCAST_DOT)
        y = scale * delta
        if HAS_BASE:  # in place, this program reads its own tile of base before writing it
            y += tl.load(base_ptr + out_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=tile_mask)
    elif not INPLACE:  # in place, an unedited sample's tile is already right: touch nothing
        # Unedited sample: copy base untouched (bit for bit), or zeros; no LoRA work at all.
        if HAS_BASE:
            base = tl.load(base_ptr + out_offsets, mask=tile_mask, other=0.0)
            tl.store(out_ptr + out_offsets, base.to(out_ptr.dtype.element_ty), mask=tile_mask)
        else:
            tl.store(out_ptr + out_offsets, tl.zeros([BLOCK_T, BLOCK_D], out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit(do_not_specialize=["N", "T"])
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


def rank_tile(k: int) -> int:
    """``BLOCK_K``: the rank padded for ``tl.dot`` (every dim ≥ 16); also the row width of ``h``."""
    return max(16, triton.next_power_of_2(max(k, 1)))


def token_tile(t: int) -> int:
    """Token tile of the per-tile kernels: 16 for decode-sized inputs (T ≤ 16), else 64.

    Two buckets only, so a new T never compiles a new variant. Also the representative T of each
    bucket for warm-up: ``{token_tile(t) for t in range(1, 10**5)} == {16, 64}``.
    """
    return 16 if t <= 16 else 64


def _feature_tile(d: int, cap: int) -> int:
    """A power-of-two tile of a feature dimension (≥ 16 for tl.dot), at most ``cap``: fixed per layer."""
    return min(cap, max(16, triton.next_power_of_2(d)))


# GPU tile sizes, per kernel and dtype: no variant spills registers on sm_90, by the ptxas reports of
# CUDA 12.8 (Triton 3.6) and 13.4 (Triton 3.9) for fp32/bf16/fp16, d in {16, 32, 64, 128, 4096} and
# k in {1, 8, 32} (benchmarks/gpu_stages/compile_report.py; `benchmarks/gpu_check.py --only compile` prints the report).
# fp32 dots are IEEE FMA loops, which hold more in registers than tensor-core dots, hence the
# smaller tiles; ptxas's spill decisions move erratically with the tile shape and its version, so
# each exception below is one a report showed. The interpreter instead prefers few, large tiles:
# its cost is per operation, not per element.


def project_config(d: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Constexprs and launch options of ``_block_lora_project_kernel`` over feature dim ``d``."""
    if on_gpu:
        return dict(BLOCK_T=16, BLOCK_D=_feature_tile(d, 64 if dtype == torch.float32 else 128), num_warps=4)
    return dict(BLOCK_T=64, BLOCK_D=_feature_tile(d, 256))


def expand_config(t: int, d: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Constexprs and launch options of ``_block_lora_expand_kernel`` writing ``[*, t, d]``."""
    block_t = token_tile(t)
    if on_gpu:
        if dtype == torch.float32:
            block_t = min(block_t, 32)
        return dict(BLOCK_T=block_t, BLOCK_D=_feature_tile(d, 128), num_warps=4 if block_t <= 16 else 8)
    return dict(BLOCK_T=block_t, BLOCK_D=_feature_tile(d, 256))


def dw_config(d: int, k: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Constexprs and launch options of ``_block_lora_bwd_dw_kernel`` over column dim ``d``."""
    if on_gpu:
        block_d = _feature_tile(d, 128)
        if dtype == torch.float32 and rank_tile(k) > 16:  # FMA dots with a wide rank: ptxas spills otherwise
            return dict(BLOCK_T=32, BLOCK_D=block_d, BLOCK_N=64, num_warps=4)
        return dict(BLOCK_T=64, BLOCK_D=block_d, BLOCK_N=64, num_warps=8 if block_d >= 128 else 4)
    return dict(BLOCK_T=64, BLOCK_D=_feature_tile(d, 256), BLOCK_N=64)


def _project(rows, bank, block_ids, h, factor, block_k):
    """Launch ``h[n] = factor * rows[n] @ bank[ids[n]].T`` (rows of unedited samples untouched)."""
    n, t, d = rows.shape
    config = project_config(d, rows.dtype, gpu_tiles(rows.device))
    launch(
        _block_lora_project_kernel,
        (n, triton.cdiv(t, config["BLOCK_T"])),
        rows.device,
        rows,
        bank,
        block_ids,
        h,
        float(factor),
        t,
        d,
        bank.shape[1],
        bank.shape[0],
        DOT_PRECISION=_dot_precision(rows.dtype),
        UPCAST_DOT=_UPCAST_DOT,
        BLOCK_K=block_k,
        **config,
    )


def _expand(h, bank, block_ids, base, out, scale, inplace):
    """Launch ``out[n] = base[n] + scale * h[n] @ bank[ids[n]]`` (base or zeros for unedited samples)."""
    n, t, d = out.shape
    config = expand_config(t, d, out.dtype, gpu_tiles(out.device))
    launch(
        _block_lora_expand_kernel,
        (n, triton.cdiv(t, config["BLOCK_T"]), triton.cdiv(d, config["BLOCK_D"])),
        out.device,
        h,
        bank,
        block_ids,
        base if base is not None else out,  # dummy pointer when unused
        out,
        float(scale),
        t,
        d,
        bank.shape[1],
        bank.shape[0],
        HAS_BASE=base is not None,
        INPLACE=inplace,
        DOT_PRECISION=_dot_precision(out.dtype),
        UPCAST_DOT=_UPCAST_DOT,
        BLOCK_K=h.shape[2],
        **config,
    )


def _weight_grad(lhs, rhs, block_ids, dw, factor):
    """Launch ``dw[b] = factor * Σ_{n: ids[n] == b} lhs[n].T @ rhs[n]`` for every block b."""
    n, t, d = rhs.shape
    n_blocks, k, _ = dw.shape
    config = dw_config(d, k, rhs.dtype, gpu_tiles(rhs.device))
    launch(
        _block_lora_bwd_dw_kernel,
        (n_blocks, triton.cdiv(d, config["BLOCK_D"])),
        rhs.device,
        lhs,
        rhs,
        block_ids,
        dw,
        float(factor),
        n,
        t,
        d,
        k,
        DOT_PRECISION=_dot_precision(rhs.dtype),
        UPCAST_DOT=_UPCAST_DOT,
        BLOCK_K=lhs.shape[2],
        **config,
    )


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
    """Forward pass: ``(out, h)``; two launches (project, then expand).

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
    n, t, _ = x.shape
    _, k, d_out = B.shape
    if inplace:
        if base is None or not base.is_contiguous():
            raise ValueError("block_lora_fwd: inplace=True needs a contiguous base to write into")
        out = base
    else:
        out = torch.empty((n, t, d_out), dtype=x.dtype, device=x.device)
    h = torch.empty((n, t, rank_tile(k)), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out, (h if store_h else None)
    x, A, B, block_ids = x.contiguous(), A.contiguous(), B.contiguous(), block_ids.contiguous()
    base = base.contiguous() if base is not None else None
    _project(x, A, block_ids, h, 1.0, h.shape[2])
    _expand(h, B, block_ids, base, out, scale, inplace)
    return out, (h if store_h else None)


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
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    grad_a = torch.empty((n_blocks, k, d_in), dtype=A.dtype, device=device) if need_a else None
    grad_b = torch.empty((n_blocks, k, d_out), dtype=B.dtype, device=device) if need_b else None
    if n * t == 0 or k == 0:
        # Nothing flows back: every gradient is zero (shape test only, no host sync).
        return tuple(g.zero_() if g is not None else None for g in (grad_x, grad_a, grad_b))
    if need_b and h is None:
        raise ValueError("block_lora_bwd: grad_B needs the h saved by block_lora_fwd(store_h=True)")
    grad_out = grad_out.contiguous()
    x, A, B, block_ids = x.contiguous(), A.contiguous(), B.contiguous(), block_ids.contiguous()

    if need_x or need_a:
        dh = torch.empty((n, t, rank_tile(k)), dtype=torch.float32, device=device)
        _project(grad_out, B, block_ids, dh, scale, dh.shape[2])
    if need_x:
        _expand(dh, A, block_ids, None, grad_x, 1.0, inplace=False)
    # dA and dB: grid (block, column tile); see _block_lora_bwd_dw_kernel for why this is deterministic.
    if need_a and n_blocks > 0:
        _weight_grad(dh, x, block_ids, grad_a, 1.0)  # dh already carries the scale
    if need_b and n_blocks > 0:
        _weight_grad(h, grad_out, block_ids, grad_b, scale)
    return grad_x, grad_a, grad_b


# ---------------------------------------------------------------------------------------------
# What the backend calls (``__init__.py``; the autograd of the op: ``melo_fast.ops.custom_ops``)
# ---------------------------------------------------------------------------------------------


def check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"triton backend: block_lora needs CUDA tensors, got {x.device} (or set TRITON_INTERPRET=1)")


def block_lora_inplace(x, A, B, block_ids, scale, base):
    """:func:`block_lora_fwd` written into ``base`` (contiguous, not fp64), recorded as an in-place write.

    Called as :func:`melo_fast.ops.block_lora` with ``inplace=True``, once it has checked that no
    gradient is needed and that ``base`` shares no memory with the inputs.
    """
    check_device(x)
    if base.is_inference() and not torch.is_inference_mode_enabled():  # what any in-place torch op refuses
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode is not allowed.")
    torch.autograd.graph.increment_version(base)  # autograd's record of the in-place write
    return block_lora_fwd(x, A, B, block_ids, scale, base, inplace=True)[0]
