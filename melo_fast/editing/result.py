""":class:`EditResult`: what one edit batch did, as ``MeloEditor.edit`` returns it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EditResult:
    """What one edit batch did.

    Attributes:
        block_id: the block trained for this batch.
        loss: the model's loss at the last training step.
        keys: number of keys the batch inserted: one per row (for ``edit_texts``, one per prompt and
            one per paraphrase).
        new_clusters / merged / conflicts / forgotten / superseded: how the keys entered the database
            (``superseded``: earlier edits of the same inputs that this batch replaced).
        steps: optimizer steps taken (at most ``num_iter``; fewer when the edit converged earlier).
        seconds: wall time of the whole edit.
    """

    block_id: int
    loss: float
    keys: int
    new_clusters: int
    merged: int
    conflicts: int
    forgotten: int
    superseded: int
    steps: int
    seconds: float
