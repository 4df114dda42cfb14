"""BlockLoRAHook: the block LoRA of one target, ``y = W x + s (x A_b^T) B_b`` for the block ``b`` of each sample.

MELO's layers attach to existing modules as a child (``melo_router`` / ``melo_lora``) and act through
a forward hook on them, instead of replacing the module by a wrapper. Why: the model's own parameter
names, module types and ``state_dict`` stay exactly as they were, so checkpoints, ``isinstance``
checks and existing training loops keep working, and unpatching is removing the hook.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from melo_fast import ops
from melo_fast.bank import BlockBank, BlockChunk
from melo_fast.routing.calls import RefusesCopy, Routing
from melo_fast.targets import linear_shape


class BlockLoRAHook(RefusesCopy, nn.Module):
    """The forward hook of one ``nn.Linear`` / ``Conv1D`` target (attached as its child ``melo_lora``).

    Trained blocks live in ``bank`` (a :class:`~melo_fast.bank.BlockBank`, saved by the editor, not
    by the model's ``state_dict``); a forward call reads them through the edit state its router
    searched (``call.edit_state.blocks[name]``: ``A [n, k, d_in]``, ``B [n, k, d_out]`` per bank buffer,
    in the module's dtype). While a block is open for training, ``active_A [n, k, d_in]`` and
    ``active_B [n, k, d_out]`` are the only trainable parameters (float32 master copies, cast to the
    activation dtype in forward); the new block is ``active_A[active_block]`` (see :meth:`open_block`).
    """

    def __init__(self, name: str, module: nn.Module, routing: Routing, rank: int, scale: float, backend):
        super().__init__()
        self.name = name
        self.routing = routing
        self.rank = rank
        self.scale = scale
        self.backend = backend
        self.d_in, self.d_out = linear_shape(module)
        self._weight_dtype, self._weight_device = module.weight.dtype, module.weight.device
        self.bank = self.new_bank()
        self.active_A: nn.Parameter | None = None
        self.active_B: nn.Parameter | None = None
        self.active_block = 0

    def new_bank(self) -> BlockBank:
        """An empty bank for this target (in the target weight's dtype and device)."""
        return BlockBank(self.rank, self.d_in, self.d_out, self._weight_dtype, self._weight_device)

    # --- training one block -------------------------------------------------------------------
    def open_block(self, earlier: tuple[BlockChunk, ...]) -> list[nn.Parameter]:
        """Create the new block's parameters: A as MELO initializes it (kaiming, a=sqrt(5); DESIGN §1), B = 0.

        The parameters are bank-shaped (``[n, k, d]``) with the new block at ``active_block``: just
        the new block (n = 1) normally, or, with the ``reference`` backend, the ``earlier`` blocks
        (those of the published state) plus the new one, because MELO (DESIGN §1) trains its
        full-rank LoRA matrices (the other blocks get zero gradient; it is the baseline that
        block-only training is measured against).
        """
        device = self.bank.device
        new_A = torch.empty(1, self.rank, self.d_in, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(new_A[0], a=math.sqrt(5))
        new_B = torch.zeros(1, self.rank, self.d_out, device=device, dtype=torch.float32)
        if self.backend == "reference":
            new_A = torch.cat([chunk.A.float() for chunk in earlier] + [new_A])
            new_B = torch.cat([chunk.B.float() for chunk in earlier] + [new_B])
        self.active_block = new_A.shape[0] - 1
        self.active_A, self.active_B = nn.Parameter(new_A), nn.Parameter(new_B)
        return [self.active_A, self.active_B]

    def store_block(self) -> None:
        """Append the open block to the bank (past every published view: no reader sees it yet)."""
        self.bank.append(self.active_A.detach()[self.active_block], self.active_B.detach()[self.active_block])

    def close_block(self) -> None:
        self.active_A = None
        self.active_B = None

    # --- blocks as tensors (save, export, load) -------------------------------------------------
    def blocks_of(self, chunks: tuple[BlockChunk, ...], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks of ``chunks`` (one edit state's views of the bank) as ``(A [n, k, d_in], B [n, k, d_out])``.

        Views of the bank when it is one buffer on ``device`` (do not modify them), fresh tensors
        otherwise. ``device``: None for the bank's.
        """
        if not chunks:
            like = {"dtype": self.bank.dtype, "device": device or self.bank.device}
            return tuple(torch.empty(0, self.rank, d, **like) for d in (self.d_in, self.d_out))
        if len(chunks) == 1:
            return chunks[0].A.to(device), chunks[0].B.to(device)
        return tuple(torch.cat([getattr(c, m).to(device) for c in chunks]) for m in ("A", "B"))

    def bank_of(self, A: torch.Tensor, B: torch.Tensor, num_blocks: int) -> BlockBank:
        """A new bank holding ``A [num_blocks, k, d_in]`` and ``B [num_blocks, k, d_out]`` (e.g. from a save).

        Raises:
            ValueError: the shapes do not fit this target (the blocks belong to another model).
        """
        expected_A, expected_B = (num_blocks, self.rank, self.d_in), (num_blocks, self.rank, self.d_out)
        if tuple(A.shape) != expected_A or tuple(B.shape) != expected_B:
            raise ValueError(
                f"melo_fast: blocks of {self.name!r} have shapes {tuple(A.shape)}/{tuple(B.shape)}, this model "
                f"needs {expected_A}/{expected_B}: they belong to another model"
            )
        bank = self.new_bank()
        bank.extend(A.to(bank.device), B.to(bank.device))
        return bank

    # --- forward ------------------------------------------------------------------------------
    def hook(self, module, args, output):
        routing = self.routing
        if routing.disabled:
            return None
        x = args[0]
        if routing.training:
            # Every sample of an edit batch trains the open block.
            block_ids = torch.full((1,), self.active_block, dtype=torch.int64, device=x.device)
            chunks = (BlockChunk(0, self.active_A, self.active_B),)
        else:
            call = routing.call
            if call.edit_state is None:
                raise RuntimeError(
                    f"melo_fast: target module {self.name!r} ran before the router in this forward call, so "
                    "no routing was decided for it. Choose targets that run after the router "
                    "(MeloConfig.router / MeloConfig.targets)."
                )
            chunks = call.edit_state.blocks[self.name]
            if not chunks:
                return None
            block_ids = call.block_ids.to(x.device, non_blocking=True)
        # Group the rows by routed sample: [N, T, d], flattened [N*T, d] (OPT) and generation's
        # expanded [N*beams, T, d] (HF repeats each row in place) all keep a sample's rows contiguous.
        routed = block_ids.shape[0]
        rows = x.numel() // self.d_in
        if routed == 0 or rows % routed:
            raise RuntimeError(
                f"melo_fast: target {self.name!r} got input {tuple(x.shape)}, which does not split into the "
                f"{routed} sequences the router routed"
            )
        dtype = output.dtype  # under autocast the layer's output dtype is the compute dtype
        x = x.reshape(routed, -1, self.d_in).to(dtype)
        out = output.reshape(routed, -1, self.d_out)
        training = routing.training
        for chunk in chunks:
            ids = block_ids if len(chunks) == 1 else _ids_in_chunk(block_ids, chunk)
            A, B = chunk.A, chunk.B
            if A.dtype != dtype and not training and routed < A.shape[0]:
                # Under autocast the bank (the weight's dtype) is not the compute dtype; casting all of
                # it on every forward would cost O(blocks stored). Cast the routed samples' blocks only.
                A, B, ids = routed_blocks(A, B, ids)
            A, B = A.to(dtype), B.to(dtype)
            # Inference (no graph to record): add the edits into the layer's fresh output in place, so
            # unedited samples cost nothing and no second output is allocated. Metadata only, no sync.
            inplace = not torch.is_grad_enabled() or not (
                x.requires_grad or A.requires_grad or B.requires_grad or out.requires_grad
            )
            # The backend directly, not the public ops.block_lora: every tensor here is the hook's own, of the
            # shapes and dtype it just made, and the output is the layer's fresh one (never aliasing its
            # input), so the op's validation could not fail, while costing a decode step more than the kernel.
            impl = ops.resolve(self.backend, x.device)
            if inplace:
                out = impl.block_lora_inplace(x, A, B, ids, self.scale, out)
            else:
                out = impl.block_lora(x, A, B, ids, self.scale, out)
        return out.reshape(output.shape)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, scale={self.scale}, blocks={self.bank.count}"


def routed_blocks(A: torch.Tensor, B: torch.Tensor, ids: torch.Tensor):
    """Each sample's own block: ``A [N, k, d_in]``, ``B [N, k, d_out]`` and ids ``[N]`` (``i``, or -1 where
    ``ids`` is -1). ``block_lora`` gives the same result with them as with the whole bank. No host sync."""
    picks = ids.clamp(min=0)
    own = torch.where(ids >= 0, torch.arange(ids.shape[0], device=ids.device), -1)
    return A[picks], B[picks], own


def _ids_in_chunk(block_ids: torch.Tensor, chunk: BlockChunk) -> torch.Tensor:
    """Block ids relative to ``chunk``; samples routed to another chunk (or none) get -1."""
    local = block_ids - chunk.first
    return torch.where((local >= 0) & (local < chunk.A.shape[0]), local, -1)
