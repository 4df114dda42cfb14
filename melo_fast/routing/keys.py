"""Keys: which token of an input gives its key (positions, padding, the prompt), and reading them.

MELO reads one key per input from the router's output. The paper's released implementation takes
position -1, a pad token for the shorter rows of a padded batch; here the position is resolved with
the attention mask (DESIGN §2.2), and for causal-LM edits the key comes from the prompt only (the
part a user will send at inference), so a bare prompt finds its edit.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from melo_fast.routing.calls import KeysCaptured, Routing


def extract_keys(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_end: torch.Tensor | None,
    key_position: str | int,
) -> torch.Tensor:
    """One key per sample from the router's output.

    Args:
        hidden: ``[N, T, H]`` router output (``[N, H]`` is taken as the key itself).
        attention_mask: ``[N, T]`` 1 for real tokens, or None (every token is real).
        prompt_end: ``[N]`` int64, tokens at or after it are the edit target, not the prompt; or None.
        key_position: ``"last"`` real prompt token, ``"mean"`` over them, or an int index (negative
            counts back from the end of the padded prompt).

    Returns:
        ``[N, H]`` float32 keys. No host synchronization.
    """
    if hidden.dim() == 2:
        return hidden.float()
    n, t, _ = hidden.shape
    positions = torch.arange(t, device=hidden.device)
    if attention_mask is None:
        real = torch.ones(n, t, dtype=torch.bool, device=hidden.device)
    else:
        if attention_mask.shape != (n, t):
            raise ValueError(
                f"router output has {n} sequences of {t} tokens but attention_mask is {tuple(attention_mask.shape)}; "
                "pass the attention_mask that matches the input"
            )
        real = attention_mask.to(hidden.device).bool()
    end = torch.full((n,), t, device=hidden.device) if prompt_end is None else prompt_end.to(hidden.device)
    real = real & (positions[None, :] < end[:, None])

    if key_position == "mean":
        weights = real.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1).float() / weights.sum(1).float().clamp(min=1.0)
    if key_position == "last":
        index = torch.where(real, positions, -1).max(dim=1).values.clamp(min=0)
    else:
        index = (end + key_position if key_position < 0 else torch.full_like(end, key_position)).clamp(0, t - 1)
    return hidden[torch.arange(n, device=hidden.device), index].float()


def prompt_end(labels: torch.Tensor | None, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``[N]`` int64: where each causal-LM row's prompt ends (its first supervised label), or None.

    None unless ``labels`` has ``input_ids``' shape. A row without a prompt part (no labels, or a
    plain LM loss from token 0) ends at ``T``: the whole sequence gives its key. No host synchronization.
    """
    if labels is None or input_ids is None or labels.shape != input_ids.shape:
        return None
    supervised = labels != -100
    t = labels.shape[1]
    first = supervised.int().argmax(dim=1)  # first supervised token (argmax keeps the first max)
    return torch.where(supervised.any(dim=1) & (first > 0), first, t)


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument`` (by name, or through ``**kwargs``)."""
    parameters = inspect.signature(model.forward).parameters
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def with_generation_positions(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``inputs`` of a causal LM with the ``position_ids`` that ``generate()`` derives from a left-padded
    attention mask, so that keys read here are the ones generation routes with; unchanged otherwise."""
    mask = inputs.get("attention_mask")
    if mask is None or "position_ids" in inputs or mask.dim() != 2 or mask.shape[1] == 0:
        return inputs
    if bool(mask[:, 0].all()) or not accepts(model, "position_ids"):
        return inputs  # no left padding: the default positions are generate()'s
    positions = mask.long().cumsum(-1) - 1
    return {**inputs, "position_ids": positions.masked_fill(mask == 0, 1)}


TOKEN_ID_INPUTS = ("input_ids", "decoder_input_ids")


def check_token_ids(inputs: Mapping[str, torch.Tensor], what: str) -> None:
    """Token ids must be integers: a float tensor would reach the embedding and fail there with an error
    that does not say which input is wrong.

    Raises:
        ValueError: ``inputs["input_ids"]`` (or ``decoder_input_ids``) is a float, complex or bool tensor;
            the message names ``what`` (the argument) and the dtype.
    """
    for name in TOKEN_ID_INPUTS:
        ids = inputs.get(name)
        if isinstance(ids, torch.Tensor) and not _is_integer(ids.dtype):
            raise ValueError(
                f"melo_fast: {what}[{name!r}] is {ids.dtype}; token ids must be an integer tensor (torch.long, as "
                "the tokenizer gives them)"
            )


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def read_keys(
    model: nn.Module, routing: Routing, router: str, inputs: Mapping[str, torch.Tensor], causal_lm: bool
) -> torch.Tensor:
    """``[N, d]`` float32 keys of ``inputs``: an eval-mode, no-grad forward that stops at the ``router``.

    Raises:
        TypeError: ``inputs`` is not the dict the model takes.
        ValueError: token ids that are not integers (:func:`check_token_ids`).
        RuntimeError: the router did not run in the model's forward pass.
    """
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"melo_fast: keys()/route() take the dict the model takes (e.g. tokenizer(..., return_tensors='pt')), "
            f"got {type(inputs).__name__}"
        )
    check_token_ids(inputs, "inputs")
    if causal_lm:
        inputs = with_generation_positions(model, inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), routing.capture_keys():
            model(**inputs)
    except KeysCaptured:
        return routing.call.keys
    finally:
        model.train(was_training)
    raise RuntimeError(f"melo_fast: the router {router!r} did not run in the model's forward pass")
