"""An edit given in several wordings (a prompt and its paraphrases) as one cluster with a radius of its own.

``edit_texts(..., paraphrases=...)`` makes every paraphrase one more row of its prompt's edit. MELO places
a batch with every key's nearest cluster found once, before any key is placed, so the wordings of one
edit never meet: each becomes a cluster of its own, and the edit's scope grows by one ball per wording,
taking in other questions with it. Here the prompts go in first and the paraphrases second, as if they
came in a later batch: each paraphrase then finds its own prompt's cluster (same label, within reach)
and joins it, so the edit is one cluster centered on the mean of its wordings (the question's
prototype), its radius the larger of their spread and ``paraphrase_radius``. Both steps insert into
one block.

Why a radius of its own: the wordings' mean is a better center than any one wording, so a smaller ball
reaches as many unseen wordings; and with unit keys (a key projection) the mean lies inside the
sphere, where a ball of the same radius covers more of it. A key projection chooses the radius for
edits in several wordings on facts it never trained on (``KeyProjection.paraphrase_radius``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from melo_fast.vecdb.database import VectorDatabase
from melo_fast.vecdb.insert import InsertCounts, coinciding_conflicts


def prompt_rows(paraphrase_of: Sequence[int], labels: Sequence[tuple[int, ...]]) -> list[int]:
    """``paraphrase_of`` checked: per row, the row of the prompt it words (a prompt's own index).

    Returns:
        The prompt rows (``paraphrase_of[i] == i``), in order.

    Raises:
        ValueError: not one entry per row, an entry that is not a row, that points at a paraphrase, or
            whose row asks for another target than its prompt (the message names the row).
    """
    n = len(labels)
    if len(paraphrase_of) != n:
        raise ValueError(f"melo_fast: paraphrase_of has {len(paraphrase_of)} entries for {n} rows; give one per row")
    for row, prompt in enumerate(paraphrase_of):
        if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < n:
            raise ValueError(f"melo_fast: paraphrase_of[{row}] = {prompt!r} is not a row of the batch (0..{n - 1})")
        if paraphrase_of[prompt] != prompt:
            raise ValueError(
                f"melo_fast: paraphrase_of[{row}] = {prompt} points at a paraphrase (row {prompt} words row "
                f"{paraphrase_of[prompt]}); point every paraphrase at its prompt's row"
            )
        if tuple(labels[row]) != tuple(labels[prompt]):
            raise ValueError(
                f"melo_fast: row {row} words row {prompt} but asks for another target; a paraphrase has its prompt's "
                "target"
            )
    return [row for row in range(n) if paraphrase_of[row] == row]


def insert_wordings(
    database: VectorDatabase,
    keys: torch.Tensor,
    labels: list[tuple[int, ...]],
    block_id: int,
    paraphrase_of: Sequence[int],
    paraphrase_radius: float,
    refuse_clashes: bool = True,
) -> InsertCounts:
    """Insert one edit batch whose rows are prompts and paraphrases of them, all routing to ``block_id``.

    Prompts without paraphrases keep the database's ``init_radius`` (MELO); a prompt with paraphrases,
    and its paraphrases, get ``paraphrase_radius``. Prompts first, then paraphrases (module docstring).

    Args:
        database: changed in place (the editor passes a copy it publishes afterwards).
        keys: ``[N, d]`` float keys.
        labels: ``N`` edit targets.
        block_id: the block every row routes to.
        paraphrase_of: per row, the row of the prompt it words (its own index for a prompt).
        paraphrase_radius: the radius of an edit given in several wordings (> 0).
        refuse_clashes: refuse two rows that coincide with different labels (checked over the whole batch
            before either step; False: the caller did).

    Returns:
        The two steps' counts, added.

    Raises:
        ValueError: a bad ``paraphrase_of`` (:func:`prompt_rows`) or ``paraphrase_radius``, or rows that
            coincide with different labels (checked before anything changes).
    """
    prompts = prompt_rows(paraphrase_of, labels)
    if not (math.isfinite(paraphrase_radius) and paraphrase_radius > 0):
        raise ValueError(f"melo_fast: paraphrase_radius must be a finite number > 0, got {paraphrase_radius}")
    if refuse_clashes and (pairs := coinciding_conflicts(keys, labels, database.coincide_tolerance)):
        raise ValueError(f"VectorDatabase.insert: rows {pairs} of the batch are the same input with different targets")
    paraphrases = [row for row in range(len(labels)) if paraphrase_of[row] != row]
    worded = {paraphrase_of[row] for row in paraphrases}  # prompts given with paraphrases
    counts = InsertCounts()
    for rows in (prompts, paraphrases):
        if not rows:
            continue
        radii = [paraphrase_radius if paraphrase_of[row] in worded else database.init_radius for row in rows]
        step = database.insert(keys[rows], [labels[row] for row in rows], block_id, refuse_clashes=False, radii=radii)
        for field in vars(counts):
            setattr(counts, field, getattr(counts, field) + getattr(step, field))
    return counts
