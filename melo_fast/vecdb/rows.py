"""RowBuffer: room to append rows to an immutable ``[n, d]`` tensor without copying it.

The vector database's centers and points are ``[n, d]`` tensors that are never written once a
database holding them is published (inference threads search them while an edit is committed). A
batch of new clusters only appends rows, and copying 100k x 768 floats to append 100 rows would cost
an insert more than its own scan. So the tensors are views of the first rows of a larger buffer:

- rows are only ever written past the last row handed out in a view, so no view ever sees a write
  (the same rule as the block banks, ``melo_fast.bank``);
- a tensor may be extended in place only while it *is* the buffer's latest view (its database is the
  buffer's last writer); any other holder (an older published state, a sibling copy, a tensor set
  from outside) gets a new buffer, with one copy, when it grows. A lock makes check-and-write atomic;
- a new buffer has 25% (at least 1024 rows) of room, so appends copy each row O(1) times on average.
"""

from __future__ import annotations

import threading

import torch

GROWTH = 0.25
MIN_ROOM = 1024


class RowBuffer:
    """A ``[capacity, d]`` buffer; ``latest`` is the view of its first rows handed out last."""

    def __init__(self, rows: int, like: torch.Tensor):
        capacity = rows + max(int(rows * GROWTH), MIN_ROOM)
        self.data = like.new_empty(capacity, like.shape[1])
        self.latest = self.data[:rows]
        self._lock = threading.Lock()

    @classmethod
    def concatenated(cls, pieces: list[torch.Tensor], like: torch.Tensor) -> tuple[RowBuffer, torch.Tensor]:
        """A new buffer holding ``torch.cat(pieces)`` (one copy), and its view of those rows."""
        buffer = cls(sum(piece.shape[0] for piece in pieces), like)
        # One copy_ per piece into the buffer: no intermediate of the whole size, as torch.cat would make
        # before the copy (an insert that merges or splits stored clusters copies centers and points).
        row = 0
        for piece in pieces:
            buffer.latest[row : row + piece.shape[0]].copy_(piece)
            row += piece.shape[0]
        return buffer, buffer.latest

    @classmethod
    def appended(
        cls, buffer: RowBuffer | None, current: torch.Tensor, new: torch.Tensor
    ) -> tuple[RowBuffer, torch.Tensor]:
        """``current`` followed by ``new``: written into ``buffer`` when ``current`` is its latest view
        and there is room (no copy of ``current``), else into a new buffer. Never writes ``current``'s
        rows."""
        if buffer is not None:
            with buffer._lock:
                n, size = current.shape[0], current.shape[0] + new.shape[0]
                if buffer.latest is current and size <= buffer.data.shape[0]:
                    buffer.data[n:size] = new
                    buffer.latest = buffer.data[:size]
                    return buffer, buffer.latest
        return cls.concatenated([current, new], current)
