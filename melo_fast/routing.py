"""Per-model routing state: which block each sample of the current forward call uses.

One ``Routing`` object belongs to one patched model (no global state). What one forward call
decides lives in thread-local storage, so two threads running the same patched model on different
batches each see their own routing.

Life of one call:
1. the entry hook (on the model, and on its encoder for encoder-decoder models) records the
   attention mask and, for causal-LM edits, where each prompt ends; it clears the previous block
   ids unless this call continues a generation (KV cache already filled, or the encoder already ran),
   in which case the ids decided at prefill stay ("sticky" routing);
2. the router layer turns its output into keys, searches the database, and stores block ids;
3. every target layer reads the block ids.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch


@dataclass
class CallState:
    """What the current forward call of one thread knows about routing.

    Attributes:
        batch_size: number of sequences in the call (layers may see them flattened to ``[N*T, d]``).
        attention_mask: ``[N, T]`` mask of the router's input sequence, or None (no padding).
        prompt_end: ``[N]`` int64 index of each row's first supervised label (causal-LM edits),
            or None: keys are taken from the prompt, the part the user will send at inference.
        block_ids: ``[N]`` int64 block per sample (-1 = none), or None before the router ran.
        keys: ``[N, d]`` float32 keys captured by ``Routing.capture_keys`` (the editor reads them).
        sticky: this call continues a generation: keep ``block_ids`` from the prefill.
    """

    batch_size: int | None = None
    attention_mask: torch.Tensor | None = None
    prompt_end: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    sticky: bool = False


class Routing:
    """Routing state of one patched model.

    ``training`` is editor-wide, not per thread: while a block is open for training, every forward
    call routes all samples to it (the new block is what is being trained).
    """

    def __init__(self):
        self._local = threading.local()
        self.training = False

    @property
    def call(self) -> CallState:
        if not hasattr(self._local, "call"):
            self._local.call = CallState()
        return self._local.call

    @property
    def disabled(self) -> bool:
        return getattr(self._local, "disabled", False)

    @contextlib.contextmanager
    def disable(self):
        """In this thread, run the unedited model exactly (no lookup, no LoRA)."""
        previous = self.disabled
        self._local.disabled = True
        try:
            yield
        finally:
            self._local.disabled = previous

    @property
    def stop_after_router(self) -> bool:
        return getattr(self._local, "stop_after_router", False)

    @contextlib.contextmanager
    def capture_keys(self):
        """In this thread, make the router raise ``KeysCaptured`` once it has computed the keys.

        The editor uses it to read an edit batch's keys without running the rest of the model.
        """
        self._local.stop_after_router = True
        try:
            yield
        finally:
            self._local.stop_after_router = False

    @contextlib.contextmanager
    def generation(self):
        """In this thread, one ``generate()`` call: its first forward call decides the blocks and every
        decoding step keeps them, with or without a KV cache."""
        previous = getattr(self._local, "generating", False)
        self._local.generating = True
        self.call.block_ids = None
        try:
            yield
        finally:
            self._local.generating = previous

    def start_call(self, batch_size, attention_mask, prompt_end, continues_generation: bool) -> None:
        """Called by the entry hook at the start of a forward call.

        ``continues_generation``: the call extends a sequence already routed (a filled KV cache, or
        encoder outputs passed in); inside :meth:`generation` every call after the first does.
        """
        call = self.call
        continues = continues_generation or getattr(self._local, "generating", False)
        # Keep the prefill's routing for every decoding step (if a prefill was routed at all).
        call.sticky = continues and call.block_ids is not None
        if call.sticky:
            return
        call.batch_size = batch_size
        call.attention_mask = attention_mask
        call.prompt_end = prompt_end
        call.block_ids = None
        call.keys = None


class KeysCaptured(Exception):
    """Raised by the router inside ``Routing.capture_keys`` to stop the forward pass early."""
