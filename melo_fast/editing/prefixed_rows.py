"""Training rows behind unrelated prefixes, so a block answers its question in other contexts too.

A block trained on the bare prompt learns the target for that exact token context. Serving reaches it
with other contexts: a paraphrase routed to it (a key projection routes wordings of one question
together), or the question after a system prompt or a previous turn. WISE (Wang et al., 2024) trains
each edit also behind random prefixes, and its ablation loses generality without them. Here each row
of an edit batch gets ``copies`` more rows for training only: the same prompt and target behind a short
unrelated sentence (``calibration.NEUTRAL_PROMPTS``: fixed, model-independent, never about an edited
fact). Their prefixes are unlabelled; keys and database entries still come from the batch as given.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from melo_fast.editing.calibration import NEUTRAL_PROMPTS
from melo_fast.editing.continuation import real_rows, right_padded


def prefix_token_ids(tokenizer) -> list[list[int]]:
    """The token ids of every prefix (:data:`NEUTRAL_PROMPTS` followed by a space), without special tokens."""
    return [tokenizer(f"{text} ", add_special_tokens=False)["input_ids"] for text in NEUTRAL_PROMPTS]


def with_prefixes(
    inputs: Mapping[str, torch.Tensor], prefixes: list[list[int]], copies: int, pad_token_id: int,
    bos_token_id: int | None,
) -> dict[str, torch.Tensor]:
    """``inputs`` plus ``copies`` prefixed copies of each row.

    Args:
        inputs: a causal-LM edit batch: ``input_ids`` and ``labels`` (``[N, T]`` int64, -100 where
            unsupervised) and optionally ``attention_mask`` (``[N, T]``; None: every token real).
        prefixes: token ids of the prefixes (:func:`prefix_token_ids`); row ``i``'s copy ``j`` takes
            ``prefixes[(i * copies + j) % len(prefixes)]``, so the copies of one row differ.
        copies: prefixed copies per row (0: the batch as given).
        pad_token_id: the id that fills padding (masked and unlabelled).
        bos_token_id: a row that starts with it keeps it first, and the prefix follows it.

    Returns:
        ``{input_ids, attention_mask, labels}``, ``[N * (1 + copies), T']`` int64, right-padded: the ``N``
        rows as given (real tokens only), then each row's copies in row order.
    """
    rows = real_rows(inputs)
    out = list(rows)
    for i, (ids, row_labels) in enumerate(rows):
        start = 1 if bos_token_id is not None and len(ids) and int(ids[0]) == bos_token_id else 0
        for j in range(copies):
            prefix = ids.new_tensor(prefixes[(i * copies + j) % len(prefixes)])
            out.append((
                torch.cat([ids[:start], prefix, ids[start:]]),
                torch.cat([row_labels[:start], torch.full_like(prefix, -100), row_labels[start:]]),
            ))
    return right_padded(out, pad_token_id)
