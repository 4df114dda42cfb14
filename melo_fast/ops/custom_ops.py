"""The compiled kernels as torch custom ops, so that ``torch.compile`` and autograd see whole ops.

``torch.compile`` cannot trace into a pybind11 function or a Triton launch, so a patched model would
break its graph at every hook. Registered with ``torch.library.custom_op`` and a fake implementation
(the output's shape and dtype, computed without running anything), each kernel call is one node of
the compiled graph, as vLLM registers its LoRA kernels. The ops take the backend's name, so one op
serves every compiled backend:

- ``melo_fast::vecdb_search(queries, centers, radii, point_offsets, points, point_blocks, backend)``
  → ``[Q]`` int64 block ids;
- ``melo_fast::block_lora(x, A, B, block_ids, scale, base, backend, save_hidden)`` → ``(out, hidden)``:
  ``out [N, T, d_out]`` in x's dtype, and the fp32 ``x @ A[b].T`` that the backward needs for
  ``grad_B`` (``[N, T, hidden_width(k)]``; ``[0]`` unless ``save_hidden``). Differentiable in x, A, B
  and base; its backward runs the op ``melo_fast::block_lora_backward``;
- ``melo_fast::block_lora_(x, A, B, block_ids, scale, base, backend)``: the same sum written into
  ``base`` (declared mutated), for inference.

Eager calls that record no autograd graph (serving) call the kernels directly rather than through the
dispatcher: the same kernel, without the dispatcher's per-call overhead, which a decode step of a
small model would notice.
"""

from __future__ import annotations

import torch

from melo_fast.ops import torch_ops
from melo_fast.ops.registry import Backend

_kernel_backends: dict[str, KernelBackend] = {}  # by name: the ops below run their kernels


class KernelBackend(Backend):
    """A backend of compiled kernels: a subclass provides the kernels (the methods below that raise
    NotImplementedError); this class makes them the :class:`~melo_fast.ops.registry.Backend` ops."""

    def __init__(self, name: str):
        self.name = name
        _kernel_backends[name] = self

    # --- the kernels ----------------------------------------------------------------------------
    def accepts(self, x: torch.Tensor, base: torch.Tensor | None) -> bool:
        """Whether the block LoRA kernels take these tensors (if not, the torch backend computes the op)."""
        raise NotImplementedError

    def hidden_width(self, rank: int) -> int:
        """Last dimension of the fp32 ``hidden`` that :meth:`forward_kernel` saves for the backward."""
        raise NotImplementedError

    def search_kernel(self, queries, centers, radii, point_offsets, points, point_blocks) -> torch.Tensor:
        raise NotImplementedError

    def forward_kernel(self, x, A, B, block_ids, scale: float, base, save_hidden: bool):
        """``(out, hidden)``; hidden ``[N, T, hidden_width(k)]`` fp32, or None unless ``save_hidden``."""
        raise NotImplementedError

    def backward_kernel(self, grad_out, x, A, B, block_ids, scale: float, hidden, need_x, need_A, need_B):
        """``(grad_x, grad_A, grad_B)``, each None unless needed (``hidden`` is needed for grad_B only)."""
        raise NotImplementedError

    def inplace_kernel(self, x, A, B, block_ids, scale: float, base) -> torch.Tensor:
        """The sum written into a contiguous ``base`` of x's dtype, which it returns."""
        raise NotImplementedError

    # --- the ops ----------------------------------------------------------------------------------
    def vecdb_search(self, queries, centers, radii, point_offsets, points, point_blocks) -> torch.Tensor:
        tensors = (queries, centers, radii, point_offsets, points, point_blocks)
        if torch.compiler.is_compiling():
            return torch.ops.melo_fast.vecdb_search(*tensors, self.name)
        return self.search_kernel(*tensors)

    def block_lora(self, x, A, B, block_ids, scale: float, base) -> torch.Tensor:
        if not self.accepts(x, base):
            return torch_ops.block_lora(x, A, B, block_ids, scale, base)
        tensors = (x, A, B) if base is None else (x, A, B, base)
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if recording or torch.compiler.is_compiling():
            save_hidden = recording and B.requires_grad
            return torch.ops.melo_fast.block_lora(x, A, B, block_ids, scale, base, self.name, save_hidden)[0]
        return self.forward_kernel(x, A, B, block_ids, scale, base, False)[0]

    def block_lora_inplace(self, x, A, B, block_ids, scale: float, base) -> torch.Tensor:
        if not self.accepts(x, base) or not base.is_contiguous():
            return super().block_lora_inplace(x, A, B, block_ids, scale, base)
        if torch.compiler.is_compiling():
            torch.ops.melo_fast.block_lora_(x, A, B, block_ids, scale, base, self.name)
            return base
        return self.inplace_kernel(x, A, B, block_ids, scale, base)


# --- melo_fast::vecdb_search --------------------------------------------------------------------
@torch.library.custom_op("melo_fast::vecdb_search", mutates_args=())
def _vecdb_search(
    queries: torch.Tensor,
    centers: torch.Tensor,
    radii: torch.Tensor,
    point_offsets: torch.Tensor,
    points: torch.Tensor,
    point_blocks: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return _kernel_backends[backend].search_kernel(queries, centers, radii, point_offsets, points, point_blocks)


@_vecdb_search.register_fake
def _vecdb_search_fake(queries, centers, radii, point_offsets, points, point_blocks, backend):
    return queries.new_empty(queries.shape[0], dtype=torch.int64)


# --- melo_fast::block_lora and its backward ---------------------------------------------------------
@torch.library.custom_op("melo_fast::block_lora", mutates_args=())
def _block_lora(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    base: torch.Tensor | None,
    backend: str,
    save_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, hidden = _kernel_backends[backend].forward_kernel(x, A, B, block_ids, scale, base, save_hidden)
    return out, (hidden if save_hidden else x.new_empty(0, dtype=torch.float32))


@_block_lora.register_fake
def _block_lora_fake(x, A, B, block_ids, scale, base, backend, save_hidden):
    n, t, _ = x.shape
    out = x.new_empty(n, t, B.shape[2])
    if not save_hidden:
        return out, x.new_empty(0, dtype=torch.float32)
    return out, x.new_empty(n, t, _kernel_backends[backend].hidden_width(A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("melo_fast::block_lora_backward", mutates_args=())
def _block_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    hidden: torch.Tensor,
    backend: str,
    need_x: bool,
    need_A: bool,
    need_B: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _kernel_backends[backend].backward_kernel(
        grad_out, x, A, B, block_ids, scale, hidden if need_B else None, need_x, need_A, need_B
    )
    # A custom op returns tensors only: an empty one where no gradient was asked for.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_block_lora_backward.register_fake
def _block_lora_backward_fake(grad_out, x, A, B, block_ids, scale, hidden, backend, need_x, need_A, need_B):
    return tuple(
        torch.empty_like(t) if need else x.new_empty(0) for t, need in ((x, need_x), (A, need_A), (B, need_B))
    )


def _save_for_backward(ctx, inputs, output):
    x, A, B, block_ids, scale, _base, backend, _save_hidden = inputs
    ctx.save_for_backward(x, A, B, block_ids, output[1])
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, grad_out, _grad_hidden):
    x, A, B, block_ids, hidden = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = (None, None, None)
    if any(need):
        computed = torch.ops.melo_fast.block_lora_backward(
            grad_out, x, A, B, block_ids, ctx.scale, hidden, ctx.backend, *need
        )
        grads = tuple(g if wanted else None for g, wanted in zip(computed, need, strict=True))
    grad_base = grad_out if ctx.needs_input_grad[5] else None  # d out / d base is the identity
    return *grads, None, None, grad_base, None, None


_block_lora.register_autograd(_backward, setup_context=_save_for_backward)


# --- melo_fast::block_lora_ (in place) ------------------------------------------------------------
@torch.library.custom_op("melo_fast::block_lora_", mutates_args=("base",))
def _block_lora_inplace(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    block_ids: torch.Tensor,
    scale: float,
    base: torch.Tensor,
    backend: str,
) -> None:
    _kernel_backends[backend].inplace_kernel(x, A, B, block_ids, scale, base)


@_block_lora_inplace.register_fake
def _block_lora_inplace_fake(x, A, B, block_ids, scale, base, backend):
    return None
