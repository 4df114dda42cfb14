"""BlockBank: the append-only storage of one target's trained blocks.

A published edit state holds *views* of the first ``n`` blocks (``melo_fast.routing.state``). Appending a
block writes past the end of every view, so readers of an older state are never disturbed. Growing
must not move memory that readers may hold, nor double the memory at the moment it grows:

- while the bank is small (under ``CHUNK_BYTES``), it lives in one contiguous buffer that doubles by
  copying (a copy of at most ``CHUNK_BYTES``; one buffer keeps inference at one kernel call);
- past that, it grows by adding fixed chunks of ``CHUNK_BYTES`` that are never copied, so the memory
  in use exceeds the blocks' own size by at most one chunk. Each chunk is one kernel call at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Per target and per tensor pair (A and B together). 256 MiB holds ~2,000 blocks of a 7B-model MLP
# projection (4096 -> 11008, rank 4, bf16: 120 KiB per block) and ~4,000 of a GPT-2 one in fp32.
CHUNK_BYTES = 256 * 2**20
MIN_CAPACITY = 8


@dataclass(frozen=True)
class BlockChunk:
    """Blocks ``first .. first + A.shape[0] - 1`` of one target: ``A [n, k, d_in]``, ``B [n, k, d_out]``."""

    first: int
    A: torch.Tensor
    B: torch.Tensor


class BlockBank:
    """Trained blocks of one target, in the model's dtype and device.

    Args:
        rank: ``k``, the rank of one block.
        d_in, d_out: the target's input and output widths.
        dtype, device: where the blocks live (the target weight's).
    """

    def __init__(self, rank: int, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device):
        self.rank, self.d_in, self.d_out = rank, d_in, d_out
        self.dtype, self.device = dtype, device
        self.block_bytes = rank * (d_in + d_out) * torch.empty((), dtype=dtype).element_size()
        self.chunk_capacity = max(MIN_CAPACITY, CHUNK_BYTES // self.block_bytes)
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []  # each [capacity, k, d]
        self.count = 0

    def _allocate(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (capacity, self.rank)
        return (
            torch.zeros(*shape, self.d_in, dtype=self.dtype, device=self.device),
            torch.zeros(*shape, self.d_out, dtype=self.dtype, device=self.device),
        )

    def _make_room(self) -> None:
        """Ensure the last buffer has a free slot."""
        if self._buffers and self.count - self._first_of_last() < self._buffers[-1][0].shape[0]:
            return
        if len(self._buffers) == 1 and self._buffers[0][0].shape[0] < self.chunk_capacity:
            old_A, old_B = self._buffers[0]
            new_A, new_B = self._allocate(min(2 * old_A.shape[0], self.chunk_capacity))
            new_A[: old_A.shape[0]] = old_A
            new_B[: old_B.shape[0]] = old_B
            self._buffers[0] = (new_A, new_B)
        elif not self._buffers:
            self._buffers.append(self._allocate(MIN_CAPACITY))
        else:
            self._buffers.append(self._allocate(self.chunk_capacity))

    def _first_of_last(self) -> int:
        return sum(A.shape[0] for A, _ in self._buffers[:-1])

    def append(self, A: torch.Tensor, B: torch.Tensor) -> int:
        """Store one block (``A [k, d_in]``, ``B [k, d_out]``, any float dtype) and return its id."""
        self._make_room()
        slot = self.count - self._first_of_last()
        with torch.no_grad():
            self._buffers[-1][0][slot] = A.to(self.dtype)
            self._buffers[-1][1][slot] = B.to(self.dtype)
        self.count += 1
        return self.count - 1

    def extend(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Store ``n`` blocks at once (``A [n, k, d_in]``, ``B [n, k, d_out]``), e.g. from a save."""
        for a, b in zip(A, B, strict=True):
            self.append(a, b)

    def truncate(self, count: int) -> None:
        """Forget the blocks from ``count`` on (undo appends of a commit that failed half-way)."""
        self.count = min(self.count, count)

    def chunks(self) -> tuple[BlockChunk, ...]:
        """Views of the stored blocks, one per buffer (what a published state holds)."""
        views, first = [], 0
        for A, B in self._buffers:
            n = min(A.shape[0], self.count - first)
            if n > 0:
                views.append(BlockChunk(first, A[:n], B[:n]))
            first += A.shape[0]
        return tuple(views)
