"""RouterHook: the router module's output becomes keys, and the keys become block ids (output unchanged)."""

from __future__ import annotations

import torch
from torch import nn

from melo_fast.routing.calls import KeysCaptured, RefusesCopy, Routing
from melo_fast.routing.keys import extract_keys


class RouterHook(RefusesCopy, nn.Module):
    """The forward hook of the router module (attached to it as its child ``melo_router``).

    Searches the edit state published in ``routing.published`` and records it in the call, so the
    targets of this forward call read the blocks of the same state (see ``melo_fast.routing.calls``).

    Attributes:
        key_width: the width of the router's own keys (its output features), before any key projection.
        key_position: which token gives the key (``MeloConfig.key_position``; may be changed between calls).
    """

    def __init__(self, name: str, routing: Routing, key_position, backend: str | None, key_width: int):
        super().__init__()
        self.name = name
        self.key_width = key_width
        self.routing = routing
        self.key_position = key_position
        self.backend = backend

    def hook(self, module, args, output):
        routing = self.routing
        if routing.disabled:
            return None
        call = routing.call
        if routing.stop_after_router:
            call.keys = self._keys(output, call, routing.published)
            raise KeysCaptured
        if routing.training or call.sticky:
            return None  # training routes every sample to the open block; decoding keeps the prefill's ids
        state = routing.published
        call.edit_state = state
        if len(state.database):
            call.block_ids = state.database.search(self._keys(output, call, state), backend=self.backend)
        else:
            rows = call.batch_size or output.shape[0]
            call.block_ids = torch.full((rows,), -1, dtype=torch.int64, device=output.device)
        return None

    def _keys(self, output: torch.Tensor, call, state) -> torch.Tensor:
        """The keys of this call in the space of ``state``'s database (through its key projection, if any)."""
        # Some models (OPT) run their MLP on tokens flattened to [N*T, H]: restore [N, T, H].
        if output.dim() != 3 and call.batch_size:
            output = output.reshape(call.batch_size, -1, output.shape[-1])
        keys = extract_keys(output, call.attention_mask, call.prompt_end, self.key_position)
        return keys if state.projection is None else state.projection(keys)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, key_position={self.key_position!r}, points={len(self.routing.published.database)}"
