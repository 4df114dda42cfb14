"""Training one block: the unit ``MeloEditor.edit`` runs between opening and committing a block.

It sees only the model, the batch, the block's parameters and the settings: the editor has opened
the block (every sample of this thread's forward calls routes to it, the model is frozen and in eval
mode) and commits or drops it afterwards.

MELO's loop is a fresh Adam and StepLR over the block for a fixed ``num_iter`` steps. melo_fast's
default runs the same optimizer but (1) stops once the edit has converged (``convergence.py``) and
(2) computes the frozen blocks below the first target once (``frozen_prefix.py``); with
``MeloConfig(stop_loss=None, cache_frozen_prefix=False)`` it is MELO's loop exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from melo_fast.config import TrainSettings
from melo_fast.editing import convergence
from melo_fast.editing.frozen_prefix import FrozenPrefix


@dataclass(frozen=True)
class TrainedBlock:
    """How training one block went.

    Attributes:
        loss: the loss of the last forward pass.
        steps: optimizer steps taken (at most ``num_iter``; fewer when the edit converged earlier).
    """

    loss: float
    steps: int


def loss_of(output) -> torch.Tensor:
    """The loss of a model output (a dict or an HF ``ModelOutput``); ValueError when there is none."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("melo_fast: the model returned no loss for the edit batch; does it take `labels`?")
    return loss


def model_loss(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss on ``inputs`` (labels included); ValueError if it returns none."""
    return loss_of(model(**inputs))


def train_block(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    parameters: list[nn.Parameter],
    settings: TrainSettings,
    targets: list[nn.Module] = (),
    in_training_thread: Callable[[], bool] = lambda: True,
    causal_lm: bool = False,
    loss_fn: Callable[[object], torch.Tensor] = loss_of,
) -> TrainedBlock:
    """Optimize an open block: Adam + StepLR over ``parameters`` for at most ``num_iter`` steps.

    Args:
        model: the patched model, with the block open in this thread.
        inputs: the edit batch the model takes (labels included).
        parameters: the open block's parameters (``MeloEditor.open_block`` returns them).
        settings: learning rate, steps, schedule, early stop and frozen-prefix replay.
        targets: the modules carrying the block LoRA (the frozen prefix ends where the first one starts);
            empty: no replay.
        in_training_thread: whether the calling thread trains the block (only its forwards are replayed).
        causal_lm: the model is decoder-only (its logits predict the next position's label).
        loss_fn: the scalar loss to minimize, from a model output; default the model's own loss.

    Returns:
        The loss of the last forward pass and the number of optimizer steps.

    Raises:
        FloatingPointError: the loss became non-finite (the caller drops the block).
    """
    optimizer = torch.optim.Adam(parameters, lr=settings.edit_lr)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=settings.scheduler_step, gamma=settings.scheduler_gamma
    )
    prefix = None
    if settings.cache_frozen_prefix and targets:
        prefix = FrozenPrefix(model, list(targets), lambda: model(**inputs), loss_fn, in_training_thread)
    forward = prefix.step if prefix is not None else lambda: model(**inputs)
    loss_value, steps = float("nan"), 0
    with prefix or contextlib.nullcontext():
        for step in range(settings.num_iter):
            optimizer.zero_grad(set_to_none=True)
            output = forward()
            loss = loss_fn(output)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"melo_fast: edit loss became {loss_value}; the edit was dropped. "
                    "Try a smaller MeloConfig.edit_lr or scale."
                )
            if step >= settings.min_iter and _converged(settings, loss_value, output, inputs, causal_lm):
                break
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
    return TrainedBlock(loss_value, steps)


def _converged(settings: TrainSettings, loss_value: float, output, inputs, causal_lm: bool) -> bool:
    if settings.stop_loss is None or loss_value >= settings.stop_loss:
        return False
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        return False  # nothing to check the prediction on: train the fixed number of steps
    return convergence.targets_predicted(logits, inputs["labels"], causal_lm)
