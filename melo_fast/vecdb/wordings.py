"""An edit given in several wordings (a prompt and its paraphrases): which rows they are, and their radius.

``edit_texts(..., paraphrases=...)`` makes every paraphrase one more row of its prompt's edit. The
database places every row by MELO's rules, so each wording is a point (mostly a cluster) of its own, and
the edit's scope is the union of their balls: with more wordings it reaches more of the questions
around them, wanted (other paraphrases) and unwanted (other questions about the subject). So such an
edit gets a radius of its own, by its number of paraphrases, smaller than the one an edit of one
wording needs for the same locality; a key projection chooses them on facts it never trained on
(``KeyProjection.radius_for``).

Why not one cluster around the mean of the wordings (the paraphrases inserted after their prompt, so
they merge into its cluster): it routed slightly more held-out paraphrases, but MELO's conflict rule
splits a cluster at half the distance *from its center*, forgetting the points left outside, and with
several wordings per cluster later conflicts forgot the edit prompts themselves (ERR fell; measured on
zsRE, EVALUATION.md, issue 22). A wording that is its own cluster's center is never forgotten that way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence


def check_paraphrase_of(paraphrase_of: Sequence[int], labels: Sequence[tuple[int, ...]]) -> None:
    """Refuse a bad ``paraphrase_of``: per row, the row of the prompt it words (a prompt's own index).

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


def wording_radii(paraphrase_of: Sequence[int], radius_for: Callable[[int], float]) -> list[float]:
    """Per row, the radius its key is inserted with (``VectorDatabase.insert(..., radii=...)``).

    Args:
        paraphrase_of: per row, the row of the prompt it words (checked by :func:`check_paraphrase_of`).
        radius_for: the radius of an edit given with ``k`` paraphrases (``k = 0``: one wording), for every
            row of that edit.

    Raises:
        ValueError: a radius that is not a finite number > 0 (naming the number of paraphrases).
    """
    paraphrases = Counter(prompt for row, prompt in enumerate(paraphrase_of) if prompt != row)
    radii = {k: float(radius_for(k)) for k in {paraphrases[prompt] for prompt in paraphrase_of}}
    for k, radius in radii.items():
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"melo_fast: the radius of an edit with {k} paraphrase(s) must be a finite number > 0, "
                             f"got {radius}")
    return [radii[paraphrases[prompt]] for prompt in paraphrase_of]
