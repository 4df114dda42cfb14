"""Training one block: MELO's loop, the unit ``MeloEditor.edit`` runs between opening and committing a block.

It sees only the model, the batch, the block's parameters and the settings: the editor has opened
the block (every sample of this thread's forward calls routes to it, the model is frozen and in eval
mode) and commits or drops it afterwards, so a different loop (early stopping, a cached frozen prefix,
more phrasings per edit) replaces this function without touching the editor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from melo_fast.config import TrainSettings


def model_loss(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss on ``inputs`` (labels included); ValueError if it returns none."""
    output = model(**inputs)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("melo_fast: the model returned no loss for the edit batch; does it take `labels`?")
    return loss


def train_block(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], parameters: list[nn.Parameter], settings: TrainSettings
) -> float:
    """MELO's optimization of an open block: a fresh Adam and StepLR over ``parameters``, ``num_iter`` steps.

    Args:
        model: the patched model, with the block open in this thread.
        inputs: the edit batch the model takes (labels included).
        parameters: the open block's parameters (``MeloEditor.open_block`` returns them).
        settings: learning rate, steps and schedule.

    Returns:
        The loss of the last step, as a float.

    Raises:
        FloatingPointError: the loss became non-finite (the caller drops the block).
    """
    optimizer = torch.optim.Adam(parameters, lr=settings.edit_lr)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=settings.scheduler_step, gamma=settings.scheduler_gamma
    )
    loss_value = float("nan")
    for _ in range(settings.num_iter):
        optimizer.zero_grad(set_to_none=True)
        loss = model_loss(model, inputs)
        loss_value = loss.item()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"melo_fast: edit loss became {loss_value}; the edit was dropped. "
                "Try a smaller MeloConfig.edit_lr or scale."
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
    return loss_value
