"""Where a forward call (and a generation) enters the patched model: its routing starts here."""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

from melo_fast.routing.calls import RefusesCopy, Routing
from melo_fast.routing.keys import LeftPaddingCheck, prompt_end


class EntryHook(RefusesCopy):
    """Forward pre-hook (with kwargs) on the model, and on its encoder for encoder-decoders, that
    starts a call's routing: batch size, attention mask, where causal-LM prompts end, and whether the
    call continues a generation (a filled KV cache, or encoder outputs passed in).

    Args:
        model: the module the hook is registered on (its ``forward`` signature names the arguments).
        routing: the patched model's routing.
        router_in_encoder: the router runs in the encoder, so a call given ``encoder_outputs`` continues.
        causal_lm: read where each prompt ends from causal-LM labels.
        left_padding: the patched model's check for left padding that shifts its positions (one per model,
            shared by its entry hooks, so it warns once).
    """

    def __init__(
        self, model: nn.Module, routing: Routing, router_in_encoder: bool, causal_lm: bool,
        left_padding: LeftPaddingCheck,
    ):
        self.model = model
        self.routing = routing
        self.router_in_encoder = router_in_encoder
        self.causal_lm = causal_lm
        self.left_padding = left_padding
        self.signature = inspect.signature(model.forward)
        # The padding check reads a tensor on the host: free on CPU, but a device synchronization on a GPU,
        # so there it runs on the first batched call without an attention mask only, not on every request.
        # On CPU it runs until it warns (once).
        self.padding_checked = False

    def __call__(self, module, args, kwargs):
        try:
            arguments = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            arguments = dict(kwargs)
        arguments.update(arguments.pop("kwargs", {}) or {})
        mask = arguments.get("attention_mask")
        input_ids = arguments.get("input_ids")
        past = arguments.get("past_key_values")
        past_length = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_length = past.get_seq_length()
        elif isinstance(past, (tuple, list)) and past and past[0] is not None:
            past_length = past[0][0].shape[-2]
        continues = past_length > 0 or (self.router_in_encoder and arguments.get("encoder_outputs") is not None)
        ends = prompt_end(arguments.get("labels"), input_ids) if self.causal_lm else None
        batched_without_mask = mask is None and input_ids is not None and input_ids.shape[0] > 1 and not continues
        if not torch.compiler.is_compiling():  # diagnostics of eager calls
            if batched_without_mask:
                self._check_padding(input_ids)
            elif not continues and not self.left_padding.done:
                # keys()/route() (stop_after_router) return to the host anyway: they check on every call.
                self.left_padding(mask, arguments.get("position_ids"), every_call=self.routing.stop_after_router)
        sized = (input_ids, arguments.get("inputs_embeds"), mask)
        batch_size = next((v.shape[0] for v in sized if v is not None), None)
        self.routing.start_call(batch_size, mask, ends, continues)
        return None

    def _check_padding(self, input_ids: torch.Tensor) -> None:
        pad_token_id = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        if self.padding_checked or pad_token_id is None:
            return
        padded = bool((input_ids == pad_token_id).any())
        if padded or input_ids.device.type != "cpu":
            self.padding_checked = True
        if padded:
            warnings.warn(
                "melo_fast: input_ids contain padding but no attention_mask was passed; keys are taken as if "
                "every token were real. Pass attention_mask so each key comes from the last real token.",
                stacklevel=4,
            )


class GenerateWrapper(RefusesCopy):
    """Instance-level ``model.generate`` that routes once per generation; ``remove()`` undoes it."""

    def __init__(self, model: nn.Module, routing: Routing):
        self.model, self.routing = model, routing
        self.generate = model.generate
        functools.update_wrapper(self, self.generate)
        model.generate = self

    def __call__(self, *args, **kwargs):
        with self.routing.generation():
            return self.generate(*args, **kwargs)

    def remove(self) -> None:
        del self.model.generate
