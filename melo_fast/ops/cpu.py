"""The ``cpp`` backend: loader of the C++ CPU extension ``melo_fast._C`` (sources in ``csrc/``).

The extension is optional. Nothing here imports it at module import time; :func:`load` does, and
raises ImportError with the reason when it cannot (so ``melo_fast`` always imports, and the
dispatcher falls back to the torch backend). ``MELO_FAST_NO_EXT=1`` disables it at run time too.

The dispatcher (:mod:`melo_fast.ops`) has validated shapes, dtypes and devices before these run.
"""

from __future__ import annotations

import os

import torch

from melo_fast.ops import vectorized

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ext = None


def _extension():
    global _ext
    if os.environ.get("MELO_FAST_NO_EXT") == "1":
        raise ImportError("cpp backend disabled: MELO_FAST_NO_EXT=1 set")
    if _ext is None:
        try:
            from melo_fast import _C
        except ImportError as err:
            raise ImportError(
                f"extension not built: melo_fast._C cannot be imported ({err}); "
                "reinstall with `pip install --no-build-isolation -e .` (needs a C++ compiler with OpenMP)"
            ) from err
        _ext = _C
    return _ext


class BlockLoRAFunction(torch.autograd.Function):
    """Autograd for the C++ block LoRA: saves ``x @ A[b].T`` (fp32, [N, T, k]) for grad_B."""

    @staticmethod
    def forward(ctx, x, A, B, block_ids, scale, base):
        out, hidden = _extension().block_lora_forward(x, A, B, block_ids, scale, base, True)
        ctx.save_for_backward(x, A, B, block_ids, hidden)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, block_ids, hidden = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[:3]
        grad_x, grad_A, grad_B = _extension().block_lora_backward(
            grad_out.contiguous(), x, A, B, block_ids, ctx.scale, hidden, need_x, need_A, need_B
        )
        grad_base = grad_out if ctx.needs_input_grad[5] else None
        return grad_x, grad_A, grad_B, None, None, grad_base


class _CppBackend:
    """The two ops of the ``cpp`` backend (see :mod:`melo_fast.ops` for their contracts)."""

    @staticmethod
    def vecdb_search(queries, centers, radii, point_offsets, points, point_blocks):
        return _extension().vecdb_search(queries, centers, radii, point_offsets, points, point_blocks)

    @staticmethod
    def block_lora(x, A, B, block_ids, scale, base=None):
        if x.dtype not in _KERNEL_DTYPES or (base is not None and base.dtype != x.dtype):
            # Mixed-precision base (the result is then promoted) or float64: rare, keep torch semantics.
            return vectorized.block_lora(x, A, B, block_ids, scale, base)
        tensors = (x, A, B) if base is None else (x, A, B, base)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return BlockLoRAFunction.apply(x, A, B, block_ids, float(scale), base)
        # Inference (e.g. a decode step): one call, no autograd bookkeeping, no saved hidden.
        return _extension().block_lora_forward(x, A, B, block_ids, float(scale), base, False)[0]

    @staticmethod
    def block_lora_inplace(x, A, B, block_ids, scale, base):
        """``block_lora`` written into ``base`` by the kernel (rows of block -1 untouched), or None
        when the kernel cannot write there (non-contiguous base, float64): the dispatcher then
        computes out of place and copies. The dispatcher has checked that no gradient is needed."""
        if x.dtype not in _KERNEL_DTYPES or not base.is_contiguous():
            return None
        return _extension().block_lora_inplace(x, A, B, block_ids, float(scale), base)


def load():
    """The ``cpp`` backend object, or ImportError saying why it is unavailable."""
    _extension()
    return _CppBackend


def isa() -> str:
    """Instruction set the C++ kernels use on this CPU ("avx512", "avx2" or "baseline")."""
    return _extension().isa()
