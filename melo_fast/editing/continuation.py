"""The unedited model's own continuation after an edit's target, as more training labels.

A MELO block stays on for every token of a routed sequence, including every token it generates. Trained
on the target tokens alone, it learns to push the target at every position, and generation repeats it
("The largest planet is Saturn Saturn Saturn ..."). So, for decoder-only models, the edit batch is
extended once per edit: each row's prompt + target is continued greedily for a few tokens by the
*unedited* model (editing switched off), and those tokens join the labels. The block then learns to
state the new fact and go on as the model itself would after it (stop, or continue sensibly), which
is the behaviour an edited answer should have. The keys and the edit targets the database stores are
read from the batch as given; only training sees the extension.

The target must still be learned as fast as without the extension: averaged together, eight easy
continuation tokens would outweigh a two-token target and slow its learning (a fixed step budget then
ends with the target unlearned). So training minimizes ``target_then_continuation_loss``: the mean loss
over the target tokens plus the mean loss over the continuation tokens, each part weighted as one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def with_continuation(model: nn.Module, inputs: Mapping[str, torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """``inputs`` with each row extended by the model's greedy continuation (at most ``tokens`` tokens).

    Call it with editing switched off (``routing.disable()``): the continuation is the unedited model's.

    Args:
        model: a decoder-only model that generates (HF ``generate``).
        inputs: a causal-LM edit batch: ``input_ids``, ``labels`` (``[N, T]`` int64, -100 on the prompt
            and padding) and optionally ``attention_mask`` (``[N, T]``, 1 for real tokens; None: all real).
        tokens: how many tokens to continue each row by; a row stops early at an end-of-sequence
            token, which is kept (so the block learns to stop where the model stops).

    Returns:
        A new batch ``{input_ids, attention_mask, labels}``, right-padded, ``[N, T']`` int64 with
        ``T' <= T + tokens``: each row's real tokens, then its continuation, which is labelled too.
    """
    input_ids = inputs["input_ids"]
    stops = _end_of_sequence_ids(model)
    pad_token_id = _pad_token_id(model, stops)
    rows = real_rows(inputs)

    # Left-padded for generation, so every row's continuation starts right after its own last token.
    length = max(ids.shape[0] for ids, _ in rows)
    prompts = input_ids.new_full((len(rows), length), pad_token_id)
    prompt_mask = torch.zeros_like(prompts)
    for i, (ids, _) in enumerate(rows):
        prompts[i, length - ids.shape[0] :] = ids
        prompt_mask[i, length - ids.shape[0] :] = 1
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=tokens, do_sample=False,
            num_beams=1, pad_token_id=pad_token_id,
        )[:, length:]  # fmt: skip

    extended = []
    for (ids, row_labels), continuation in zip(rows, generated.tolist(), strict=True):
        kept = []
        for token in continuation:
            kept.append(token)
            if token in stops:
                break
        tail = ids.new_tensor(kept)
        extended.append((torch.cat([ids, tail]), torch.cat([row_labels, tail])))
    return right_padded(extended, pad_token_id)


def real_rows(inputs: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's real tokens (its ``attention_mask``; every token without one): ``(ids [T_i], labels [T_i])``."""
    input_ids, labels = inputs["input_ids"], inputs["labels"]
    mask = inputs.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    return [(input_ids[i][real[i]], labels[i][real[i]]) for i in range(input_ids.shape[0])]


def right_padded(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``(ids, labels)`` rows as one right-padded batch ``{input_ids, attention_mask, labels}`` (``[N, T']``
    int64; padding is ``pad_token_id``, masked and labelled -100)."""
    width = max(ids.shape[0] for ids, _ in rows)
    out_ids = rows[0][0].new_full((len(rows), width), pad_token_id)
    out_labels = rows[0][1].new_full((len(rows), width), -100)
    out_mask = torch.zeros_like(out_ids)
    for i, (ids, row_labels) in enumerate(rows):
        out_ids[i, : ids.shape[0]] = ids
        out_labels[i, : ids.shape[0]] = row_labels
        out_mask[i, : ids.shape[0]] = 1
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}


def target_then_continuation_loss(
    inputs: Mapping[str, torch.Tensor], extended: Mapping[str, torch.Tensor]
) -> Callable[[object], torch.Tensor]:
    """The training loss for ``extended = with_continuation(model, inputs, tokens)``.

    Args:
        inputs: the causal-LM edit batch as given (``labels`` ``[N, T]``, -100 where unsupervised).
        extended: its extension (``[N, T']``), whose labels past each row's ``T_i`` real tokens are the
            continuation.

    Returns:
        ``loss(output) -> scalar float32 tensor``: mean cross-entropy over the target tokens plus mean
        cross-entropy over the continuation tokens (the second term is 0 when no row was continued),
        read from ``output.logits`` (``[N, T', V]``; position ``t`` predicts the label at ``t + 1``).
    """
    mask = inputs.get("attention_mask")
    lengths = inputs["input_ids"].new_full((inputs["input_ids"].shape[0],), inputs["input_ids"].shape[1])
    if mask is not None:
        lengths = mask.sum(dim=1)
    labels = extended["labels"][:, 1:]
    positions = torch.arange(1, extended["labels"].shape[1], device=labels.device)
    supervised = labels != -100
    continued = supervised & (positions[None, :] >= lengths[:, None])
    parts = [part for part in (supervised & ~continued, continued) if part.any()]

    def loss(output) -> torch.Tensor:
        logits = output["logits"] if isinstance(output, Mapping) else output.logits
        per_token = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
        ).view_as(labels)
        return sum(per_token[part].mean() for part in parts)

    return loss


def _pad_token_id(model: nn.Module, stops: set[int]) -> int:
    """The id that pads generated and extended rows: the model's pad token, else an end-of-sequence one."""
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(config, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return min(stops) if stops else 0  # any id will do: padded positions are masked and unlabelled


def _end_of_sequence_ids(model: nn.Module) -> set[int]:
    """The token ids that end a generation for ``model`` (its generation config's, else its config's)."""
    config = getattr(model, "generation_config", None) or getattr(model, "config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])}
