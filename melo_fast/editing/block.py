"""The block being trained, from ``MeloEditor.open_block`` to its commit or abort."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from melo_fast.routing import BlockLoRAHook, Routing


@dataclass
class OpenBlock:
    """One open block: what its commit inserts, its parameters, and what opening it changed.

    Attributes:
        keys: ``[N, d]`` float32 keys of the edit batch.
        targets: each row's edit target, as the database compares them.
        radius: the ``init_radius`` its commit uses (measured at opening if ``"auto"`` and not yet known).
        key_scale: the key scale the radius was measured from, or None.
        key_radii: per row, the radius its key is inserted with (an edit given with paraphrases:
            :mod:`melo_fast.vecdb.wordings`), or None: ``radius`` for every row (MELO).
        parameters: A and B of every target (float32 master copies), what an optimizer trains.
        frozen: the model's parameters whose ``requires_grad`` opening switched off.
        thread: the opener: only its forward calls train the block, so only it may commit or abort.
    """

    keys: torch.Tensor
    targets: list[tuple[int, ...]]
    radius: float
    key_scale: float | None
    key_radii: list[float] | None = None
    parameters: list[nn.Parameter] = field(default_factory=list)
    frozen: list[nn.Parameter] = field(default_factory=list)
    thread: int = field(default_factory=threading.get_ident)

    def open(self, model: nn.Module, routing: Routing, lora_layers: dict[str, BlockLoRAHook], freeze: bool) -> None:
        """Make the block's parameters in every target and route this thread's forward calls to it.

        ``freeze``: switch off ``requires_grad`` of the model's own parameters until :meth:`close`. If
        opening fails half-way (say, out of memory), everything it did is undone.
        """
        if freeze:
            self.frozen = [p for p in model.parameters() if p.requires_grad]
            for parameter in self.frozen:
                parameter.requires_grad_(False)
        try:
            earlier = routing.published.blocks
            self.parameters = [p for name, layer in lora_layers.items() for p in layer.open_block(earlier[name])]
        except BaseException:
            self.close(routing, lora_layers)  # unfreezes the model and closes the layers opened so far
            raise
        routing.start_training()

    def close(self, routing: Routing, lora_layers: dict[str, BlockLoRAHook]) -> None:
        """Undo :meth:`open`: unfreeze the model, drop the block's parameters, route as committed again."""
        for parameter in self.frozen:
            parameter.requires_grad_(True)
        for layer in lora_layers.values():
            layer.close_block()
        routing.stop_training()
