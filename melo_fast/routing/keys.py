"""Keys: which token of an input gives its key (positions, padding, the prompt), and reading them.

MELO reads one key per input from the router's output. The paper's released implementation takes
position -1, a pad token for the shorter rows of a padded batch; here the position is resolved with
the attention mask (DESIGN §2.2), and for causal-LM edits the key comes from the prompt only (the
part a user will send at inference), so a bare prompt finds its edit.

One rule for every path: a key is computed from the inputs exactly as the model is called with them.
So ``route()``, ``keys()``, ``adapter_names()`` and a plain forward agree on the same inputs (and PEFT
fed ``adapter_names(inputs)`` serves what the patched model computes), and ``generate()``, which passes
the model position ids derived from the attention mask, routes with those. Where left padding makes
the model itself see other positions than the unpadded prompt (absolute position embeddings, without
``position_ids``), :class:`LeftPaddingCheck` says so once.
"""

from __future__ import annotations

import inspect
import warnings
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


def _absolute_position_tables(model: nn.Module) -> list[str]:
    """Names of the learned position embeddings that number positions from the first token (padding included).

    Rotary, relative and ALiBi models have none: masked left padding shifts nothing their attention sees.
    Left out too: tables indexed from the attention mask (OPT) or from the non-pad tokens (an embedding
    with a ``padding_idx``, as RoBERTa's), whose positions left padding does not shift.
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))
        and module.padding_idx is None
        and "attention_mask" not in inspect.signature(module.forward).parameters
    ]


class LeftPaddingCheck:
    """Warns once per patched model when a left-padded batch without ``position_ids`` reaches a model whose
    learned absolute positions left padding shifts (GPT-2, BERT; BART's encoder).

    Such a model sees a padded row at other positions than the same prompt unpadded (how edits read their
    keys; what ``generate()`` gives it), so its key and output differ and an edit may not fire. That is the
    caller's input, and routing follows the model (module docstring); it is said once rather than silently.

    The check reads the mask on the host. On CPU that is free and runs on every call until it warns; on a
    GPU it would synchronize, so a forward checks only its first batch there (the entry hook's padding check
    does the same), while ``keys()``/``route()``/``adapter_names()``, which return to the host anyway, check
    every call until it warns.

    Args:
        model: the patched model (the one the user calls; its ``forward`` signature says whether it takes
            ``position_ids``).
    """

    def __init__(self, model: nn.Module):
        tables = _absolute_position_tables(model)
        self.message = None
        if tables and "position_ids" in inspect.signature(model.forward).parameters:
            self.message = (
                f"melo_fast: a left-padded batch without position_ids: this model's learned positions ({tables[0]}) "
                "then start at the padding, so its padded rows get other keys and outputs than the same prompts "
                "unpadded, and an edit may not apply to them (generate() passes position ids from the attention "
                "mask itself). Routing follows what the model sees. To match generate(), pass "
                "position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0) to the model, route(), keys() and "
                "adapter_names(); or pad on the right. (Said once per patched model.)"
            )
        elif tables:
            self.message = (
                f"melo_fast: a left-padded batch: this model's learned positions ({tables[0]}) start at the padding "
                "and it takes no position_ids, so its padded rows get other keys and outputs than the same prompts "
                "unpadded, and an edit may not apply to them. Pad on the right (tokenizer.padding_side = 'right'). "
                "(Said once per patched model.)"
            )
        self.done = self.message is None  # warned, or nothing to warn about
        self.device_checked = False

    def __call__(self, attention_mask: torch.Tensor | None, position_ids, every_call: bool) -> None:
        """Check one call's inputs. ``every_call``: check even on a GPU after the first batch (``keys()``)."""
        if self.done or position_ids is not None or attention_mask is None or attention_mask.dim() != 2:
            return
        if attention_mask.device.type != "cpu" and not every_call:
            if self.device_checked:
                return
            self.device_checked = True
        if attention_mask.shape[1] == 0 or bool(attention_mask[:, 0].all()):
            return
        self.done = True
        warnings.warn(self.message, UserWarning, stacklevel=3)


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


def read_keys(model: nn.Module, routing: Routing, router: str, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N, d]`` float32 keys of ``inputs``: an eval-mode, no-grad forward that stops at the ``router``.

    The model sees ``inputs`` exactly as given, as in a plain forward call (module docstring).

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
