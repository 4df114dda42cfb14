"""Per-model routing: the published edit state, and what each thread's current forward call decided.

One :class:`Routing` object belongs to one patched model (no global state). It holds the published
:class:`~melo_fast.routing.state.EditState` (replaced, never modified, by commit and reload) and, per
thread, a :class:`Call`. So:

- two threads running the same patched model on different batches each see their own routing;
- a block opened for training is visible only to the thread that opened it: every other thread keeps
  running the committed model (DESIGN §2.11);
- one forward call reads the published state once, at the router, and uses that object until the
  call ends (and, in generation, until the last decoding step), so a concurrent commit is seen
  entirely or not at all.

Life of one call:
1. the entry hook (on the model, and on its encoder for encoder-decoder models) records the
   attention mask and, for causal-LM edits, where each prompt ends; it clears the previous block
   ids unless this call continues a generation (KV cache already filled, or the encoder already ran),
   in which case the ids decided at prefill stay ("sticky" routing);
2. the router hook takes the published state, turns its output into keys, searches the state's
   database, and stores the block ids and the state in the call;
3. every target hook reads the block ids and the blocks of that same state.

Everything per thread lives in a ``threading.local``, which ``torch.compile`` traces (it guards on
the values it reads, in the calling thread), so a compiled model keeps this isolation.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from melo_fast.routing.state import EditState


@dataclass
class Call:
    """What the current forward call of one thread knows about routing.

    Attributes:
        batch_size: number of sequences in the call (layers may see them flattened to ``[N*T, d]``).
        attention_mask: ``[N, T]`` mask of the router's input sequence, or None (no padding).
        prompt_end: ``[N]`` int64 index of each row's first supervised label (causal-LM edits),
            or None: keys are taken from the prompt, the part the user will send at inference.
        block_ids: ``[N]`` int64 block per sample (-1 = none), or None before the router ran.
        edit_state: the edit state the router searched; the targets read their blocks from it.
        keys: ``[N, d]`` float32 keys captured by ``Routing.capture_keys`` (the editor reads them).
        sticky: this call continues a generation: keep ``block_ids`` and ``edit_state`` from the prefill.
    """

    batch_size: int | None = None
    attention_mask: torch.Tensor | None = None
    prompt_end: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    edit_state: EditState | None = None
    keys: torch.Tensor | None = None
    sticky: bool = False


class RefusesCopy:
    """Mixin of every object a patched model reaches (hooks, routing, editor, generate wrapper): ``copy.deepcopy``
    and ``pickle`` raise a TypeError that says how to copy a patched model.

    A copy would not be an independent patched model: the hooks share one routing (a thread-local call
    state, the published edit state that commits replace while other threads serve) and the editor's
    lock, and a copy taken while a commit runs could pair one state's database with another's blocks.
    A save is the consistent snapshot, and loading it attaches fresh hooks.
    """

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "melo_fast: a patched model (and its editor) cannot be copied or pickled: its hooks share one live "
            "edit state. To copy it: editor.save(path); melo_fast.unpatch(model); copy (or pickle) the model; then "
            "melo_fast.load(model, path) and melo_fast.load(copy, path). model.state_dict() works as usual (the "
            "model's own weights; the edits are what editor.save writes)"
        )


def _inside_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. activation checkpointing's recompute)."""
    return torch._C._current_graph_task_id() != -1


class Routing(RefusesCopy):
    """Routing state of one patched model.

    Attributes:
        published: the published edit state. Assigned (never mutated) by the editor's commit and
            reload; one attribute assignment, so readers see the old object or the new one.
    """

    def __init__(self, published: EditState):
        self._local = threading.local()
        self.published = published
        self._block_open = False

    @property
    def call(self) -> Call:
        if not hasattr(self._local, "call"):
            self._local.call = Call()
        return self._local.call

    # --- the open block -----------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """Whether this thread's forward calls train the open block (all samples routed to it).

        True in the thread that opened the block. Also true inside a backward pass while a block is
        open, because activation checkpointing re-runs the training forward there, and on CUDA that
        happens on autograd's own threads. Serving threads never run a backward pass. (A graph that
        ``torch.compile`` traces is not a backward pass: it reads the thread's own flag only.)
        """
        if not self._block_open:
            return False
        if getattr(self._local, "training", False):
            return True
        return not torch.compiler.is_compiling() and _inside_backward()

    def start_training(self) -> None:
        """Route this thread's forward calls to the open block (the editor holds the edit lock)."""
        self._local.training = True
        self._block_open = True

    def stop_training(self) -> None:
        """End :meth:`start_training`; called from the same thread (only the opener closes a block)."""
        self._block_open = False
        self._local.training = False

    # --- per-thread switches ------------------------------------------------------------------
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
        decoding step keeps them (and the edit state they index), with or without a KV cache."""
        previous = getattr(self._local, "generating", False)
        self._local.generating = True
        self.call.block_ids = None
        self.call.edit_state = None
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
        call.edit_state = None
        call.keys = None


class KeysCaptured(Exception):
    """Raised by the router inside ``Routing.capture_keys`` to stop the forward pass early."""
