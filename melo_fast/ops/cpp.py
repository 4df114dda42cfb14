"""The ``cpp`` backend: the C++ CPU extension ``melo_fast._C`` (sources in ``csrc/``).

The extension is optional. Nothing here imports it at module import time; :func:`load` does, and
raises ImportError with the reason when it cannot (so ``melo_fast`` always imports, and the
automatic choice falls back to the torch backend). ``MELO_FAST_NO_EXT=1`` disables it at run time too.
"""

from __future__ import annotations

import os

import torch

from melo_fast.ops.custom_ops import KernelBackend

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


class CppBackend(KernelBackend):
    """The C++/OpenMP kernels. The block LoRA's backward reads the ``x @ A[b].T`` that its forward saved
    (fp32 ``[N, T, k]``), so ``hidden_width(k) = k``."""

    def accepts(self, x, base):
        # float64, or a base of another dtype (the result is then promoted): rare, keep torch semantics.
        return x.dtype in _KERNEL_DTYPES and (base is None or base.dtype == x.dtype)

    def hidden_width(self, rank):
        return rank

    # The kernels run only on a backend that load() returned, so the extension is imported: they call
    # it directly (reading the environment on every call would cost a decode step microseconds).
    def search_kernel(self, queries, centers, radii, point_offsets, points, point_blocks):
        return _ext.vecdb_search(queries, centers, radii, point_offsets, points, point_blocks)

    def forward_kernel(self, x, A, B, block_ids, scale, base, save_hidden):
        return _ext.block_lora_forward(x, A, B, block_ids, scale, base, save_hidden)

    def backward_kernel(self, grad_out, x, A, B, block_ids, scale, hidden, need_x, need_A, need_B):
        grad_out = grad_out.contiguous()
        return _ext.block_lora_backward(grad_out, x, A, B, block_ids, scale, hidden, need_x, need_A, need_B)

    def inplace_kernel(self, x, A, B, block_ids, scale, base):
        return _ext.block_lora_inplace(x, A, B, block_ids, scale, base)


_BACKEND = CppBackend("cpp")


def load() -> CppBackend:
    """The ``cpp`` backend, or ImportError saying why it is unavailable."""
    _extension()
    return _BACKEND


def isa() -> str:
    """Instruction set the C++ kernels use on this CPU ("avx512", "avx2" or "baseline")."""
    return _extension().isa()
