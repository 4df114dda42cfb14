"""FrozenPrefix: an edit batch's frozen lower blocks, computed once and replayed at every training step.

While a block trains, the model's own parameters are frozen and the new block acts only inside the
target modules. So every transformer block that finishes before the first target module starts gives
the same output at every step: with the default targets (two thirds of the way up the stack) that is
two thirds of each training forward, recomputed for nothing. :class:`FrozenPrefix` records those
blocks' outputs on the first step and, on later steps, has each of them return its recorded output
without computing anything; the blocks above run as usual and the gradient stops where it always
stopped (nothing below the first target needs one).

Exactness is checked, not assumed. The blocks that may be replayed are found by watching the first
step: the leading blocks of each block stack that ran exactly once and finished before any target
started (so nothing they compute depends on the new block; an encoder-decoder's decoder, which reads
the encoder's edited output, keeps running). Then the first step's loss is computed a second time with
the replay (without gradient) and must equal the full forward's. Replay is refused (the full forward
runs at every step, and the reason goes to the debug log) when no block qualifies, when a recorded
output needs a gradient (its graph would be reused across steps), when the two losses differ, and
from the step at which anything has modified a recorded tensor in place.

Replay happens only in the thread that trains the block (``in_training_thread``): other threads may
serve the model meanwhile, and their calls of the same blocks run the blocks' own forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from melo_fast.targets import block_lists

logger = logging.getLogger(__name__)

# The replayed first step must give the full forward's loss: the same kernels on the same inputs give
# the same value, and a replay that is wrong changes it by far more than this (it drops whole blocks).
LOSS_RTOL = 1e-5


class FrozenPrefix:
    """Replays the frozen lower blocks of one edit batch during its training loop.

    Args:
        model: the patched model (its parameters frozen, as ``open_block`` leaves them).
        targets: the modules that carry the block LoRA; nothing before the first of them to run may change.
        forward: one training forward on the edit batch (same inputs at every call); returns the model output.
        loss_of: the loss tensor (a scalar) of an output of ``forward``.
        in_training_thread: whether the calling thread trains the block (only its calls are replayed).

    Use as a context manager around the training loop and call :meth:`step` for every forward::

        with FrozenPrefix(model, targets, lambda: model(**batch), lambda out: out.loss, thread_check) as prefix:
            for _ in range(steps):
                output = prefix.step()     # the first call runs the full forward; later ones replay
                prefix.loss_of(output).backward(); ...

    Attributes:
        replayed: blocks replayed from the second step on (0: every step runs the full forward).
        reason: why nothing is replayed, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[nn.Module],
        forward: Callable[[], Any],
        loss_of: Callable[[Any], torch.Tensor],
        in_training_thread: Callable[[], bool],
    ):
        self.model = model
        self.targets = targets
        self.forward = forward
        self.loss_of = loss_of
        self.in_training_thread = in_training_thread
        self.replayed = 0
        self.reason: str | None = None
        self._steps = 0
        self._recorded: dict[nn.Module, Any] = {}  # block -> its output of the first step
        self._versions: list[tuple[torch.Tensor, int]] = []  # recorded tensors and their version then
        self._originals: dict[nn.Module, Any] = {}  # block -> its own instance-level `forward`, if any
        self._active = False

    def __enter__(self) -> FrozenPrefix:
        return self

    def __exit__(self, *exc) -> None:
        self._uninstall()

    # --- the training loop's forward ----------------------------------------------------------
    def step(self) -> Any:
        """One training forward: the full model on the first call, the replay afterwards (when verified)."""
        self._steps += 1
        if self._steps == 1:
            output = self._record()
            self._verify(output)
            return output
        if self._active and any(t._version != v for t, v in self._versions):
            self._refuse("a recorded block output was modified in place during a training step")
        return self.forward()

    # --- first step: record and decide --------------------------------------------------------
    def _record(self) -> Any:
        """Run the full forward, recording the order blocks and targets run in and the blocks' outputs."""
        candidates = [block for stack in block_lists(self.model) for block in stack]
        if not candidates:
            self.reason = "the model has no stack of transformer blocks"
            return self.forward()
        events: list[tuple[str, nn.Module]] = []  # ("block", b) when a block finishes, ("target", t) when one starts
        calls: dict[nn.Module, int] = {}
        outputs: dict[nn.Module, Any] = {}

        def block_done(module, args, output):
            calls[module] = calls.get(module, 0) + 1
            outputs[module] = output
            events.append(("block", module))

        def target_starts(module, args):
            events.append(("target", module))

        handles = [block.register_forward_hook(block_done) for block in candidates]
        handles += [target.register_forward_pre_hook(target_starts) for target in self.targets]
        try:
            output = self.forward()
        finally:
            for handle in handles:
                handle.remove()
        first_target = next((i for i, (kind, _) in enumerate(events) if kind == "target"), None)
        if first_target is None:
            self.reason = "no target module ran in the training forward"
            return output
        frozen = {module for kind, module in events[:first_target] if kind == "block" and calls[module] == 1}
        for stack in block_lists(self.model):
            for block in stack:  # leading blocks only: a stack is run in order
                if block not in frozen:
                    break
                self._recorded[block] = outputs[block]
        if not self._recorded:
            self.reason = "no block finishes before the first target starts"
        return output

    def _verify(self, output) -> None:
        """Replay the first step once (no gradient) and compare its loss with the full forward's."""
        if not self._recorded:
            logger.debug("melo_fast: no frozen prefix replayed: %s", self.reason)
            return
        tensors = [t for out in self._recorded.values() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.requires_grad for t in tensors):
            self._refuse("a block below the first target outputs a tensor that requires grad")
            return
        self._versions = [(t, t._version) for t in tensors]
        self._install()
        with torch.no_grad():
            replayed = self.loss_of(self.forward()).item()
        full = self.loss_of(output).item()
        if not math.isclose(replayed, full, rel_tol=LOSS_RTOL, abs_tol=1e-7):
            self._refuse(f"the replayed loss {replayed!r} differs from the full forward's {full!r}")
            return
        self.replayed = len(self._recorded)
        logger.debug("melo_fast: replaying %d frozen blocks at every training step", self.replayed)

    def _refuse(self, reason: str) -> None:
        self.reason = reason
        self.replayed = 0
        self._uninstall()
        logger.debug("melo_fast: frozen prefix not replayed: %s", reason)

    # --- the replay ---------------------------------------------------------------------------
    def _install(self) -> None:
        """Give each recorded block an instance-level ``forward`` that returns its recording in the training thread."""
        for block, recorded in self._recorded.items():
            original = block.__dict__.get("forward")  # e.g. accelerate's device hook; None: the class's forward
            self._originals[block] = original
            own_forward = original if original is not None else block.forward

            def forward(*args, _recorded=recorded, _own=own_forward, **kwargs):
                if self._active and self.in_training_thread():
                    return _recorded
                return _own(*args, **kwargs)

            block.forward = forward
        self._active = True

    def _uninstall(self) -> None:
        self._active = False
        for block, original in self._originals.items():
            if original is None:
                del block.forward
            else:
                block.forward = original
        self._originals.clear()
