"""When an edit has converged: the model predicts every target token, with a loss below a threshold.

MELO trains each block for a fixed number of steps (50), though most edit batches reach their targets
far earlier. An edit is done once, under teacher forcing, every supervised token of the batch is the
argmax of the model's logits at its position (so greedy decoding of the edited prompt gives the target)
and the loss is below ``MeloConfig.stop_loss`` (a margin, so the answer does not flip under a slightly
different numeric path, such as bf16 serving). Checked on the forward pass the step computes anyway.
"""

from __future__ import annotations

import torch


def targets_predicted(logits: torch.Tensor, labels: torch.Tensor, causal_lm: bool) -> bool:
    """Whether every supervised label (not -100) is the argmax of ``logits`` at its position.

    Args:
        logits: ``[N, T, V]`` token logits (``[N, C]`` for a classifier), any float dtype.
        labels: ``[N, T]`` token ids with -100 where nothing is supervised (``[N]`` class ids).
        causal_lm: logits at position ``t`` predict the label at ``t + 1`` (decoder-only models shift,
            as their loss does); seq2seq decoders and classifiers predict the label at their own position.

    Raises:
        ValueError: logits and labels do not line up (the message gives both shapes).
    """
    if causal_lm:
        logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"melo_fast: logits {tuple(logits.shape)} do not line up with labels {tuple(labels.shape)} for the "
            "convergence check; set MeloConfig(stop_loss=None) to train a fixed number of steps"
        )
    supervised = labels != -100
    predicted = logits.argmax(dim=-1) == labels
    return bool((predicted | ~supervised).all())
