"""The ``triton`` backend: fused Triton kernels for ``vecdb_search`` and ``block_lora``.

Importing this package never imports Triton: :func:`load` does, on first use, so a machine without
Triton (or without a GPU) can still import melo_fast and fall back to another backend.

- ``vecdb_search.py``: two-stage nearest-center scan + exact re-check + in-cluster point search.
- ``block_lora.py``: masked rank-slice LoRA forward/backward (the op's autograd is
  ``melo_fast.ops.custom_ops``).
- ``_launch.py``: how every kernel is launched (device, tile configuration, fp64, recording).
- ``warmup.py``: compile every kernel variant a patched model launches, up front.
"""

from __future__ import annotations

from melo_fast.ops.custom_ops import KernelBackend

_backend = None


class TritonBackend(KernelBackend):
    """The Triton kernels, for CUDA tensors (or CPU tensors under the interpreter); fp64 goes to the
    torch backend (logged once), since ``tl.dot`` accumulates in fp32 at most."""

    def __init__(self, block_lora_module, vecdb_search_module, launch_module):
        super().__init__("triton")
        self._lora, self._search, self._launch = block_lora_module, vecdb_search_module, launch_module

    def accepts(self, x, base):
        self._lora.check_device(x)
        return not self._launch.use_torch_for_fp64("block_lora", x)

    def hidden_width(self, rank):
        return self._lora.rank_tile(rank)  # the rank padded for tl.dot

    def search_kernel(self, queries, centers, radii, point_offsets, points, point_blocks):
        return self._search.vecdb_search(queries, centers, radii, point_offsets, points, point_blocks)

    def forward_kernel(self, x, A, B, block_ids, scale, base, save_hidden):
        return self._lora.block_lora_fwd(x, A, B, block_ids, scale, base, store_h=save_hidden)

    def backward_kernel(self, grad_out, x, A, B, block_ids, scale, hidden, need_x, need_A, need_B):
        return self._lora.block_lora_bwd(
            grad_out, x, A, B, block_ids, scale, hidden, need_x=need_x, need_a=need_A, need_b=need_B
        )

    def inplace_kernel(self, x, A, B, block_ids, scale, base):
        return self._lora.block_lora_inplace(x, A, B, block_ids, scale, base)


def load() -> TritonBackend:
    """The Triton backend, or ImportError saying why not.

    Usable when Triton imports and either CUDA is available or the Triton interpreter is on
    (``TRITON_INTERPRET=1``, set before Triton is first imported; kernels then run on CPU tensors).
    """
    global _backend
    if _backend is not None:
        return _backend
    try:
        import triton
    except Exception as err:  # noqa: BLE001 - any failure means "unusable", with the reason
        raise ImportError(f"triton backend unavailable: cannot import triton ({err})") from err
    import torch

    from melo_fast.ops.triton import _launch

    if not torch.cuda.is_available() and not _launch.interpreting(triton):
        raise ImportError(
            "triton backend unavailable: no CUDA device and the Triton interpreter is off "
            "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
        )
    from melo_fast.ops.triton import block_lora, vecdb_search

    _backend = TritonBackend(block_lora, vecdb_search, _launch)
    return _backend


__all__ = ["TritonBackend", "load"]
