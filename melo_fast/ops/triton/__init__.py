"""The ``triton`` backend: fused Triton kernels for ``vecdb_search`` and ``block_lora``.

Importing this package never imports Triton: :func:`load` does, on first use, so a machine without
Triton (or without a GPU) can still import melo_fast and fall back to another backend.

- ``vecdb_search.py``: two-stage nearest-center scan + exact re-check + in-cluster point search.
- ``block_lora.py``: masked rank-slice LoRA forward/backward and ``BlockLoRAFunction``.
"""

from __future__ import annotations

import os

_backend = None


class _TritonBackend:
    """What :func:`load` returns: the two ops with the dispatcher's signatures (and the in-place
    block LoRA the dispatcher uses for ``inplace=True``)."""

    def __init__(self, vecdb_search, block_lora, block_lora_inplace):
        self.vecdb_search = vecdb_search
        self.block_lora = block_lora
        self.block_lora_inplace = block_lora_inplace


def _interpreting(triton_module) -> bool:
    knobs = getattr(triton_module, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def load():
    """The Triton backend (an object with ``vecdb_search`` and ``block_lora``), or ImportError saying why not.

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

    if not torch.cuda.is_available() and not _interpreting(triton):
        raise ImportError(
            "triton backend unavailable: no CUDA device and the Triton interpreter is off "
            "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU)"
        )
    from melo_fast.ops.triton import block_lora as block_lora_module
    from melo_fast.ops.triton import vecdb_search as vecdb_search_module

    _backend = _TritonBackend(
        vecdb_search_module.vecdb_search, block_lora_module.block_lora, block_lora_module.block_lora_inplace
    )
    return _backend


__all__ = ["load"]
