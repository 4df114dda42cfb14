"""The paper's "LoRA" baseline: sequential plain LoRA fine-tuning with MELO's rank budget.

One ordinary LoRA per target module (rank ``r = rank_per_block * number of edit batches``, the
total rank MELO's blocks add up to), applied to every input: no router, no database. Each edit
batch trains all of it with MELO's optimizer settings (a fresh Adam at ``edit_lr``, StepLR,
``num_iter`` steps, the model's own loss), batch after batch, so later batches overwrite what
earlier ones taught; that forgetting is what the baseline shows.

The LoRA product reuses ``melo_fast.ops.block_lora`` with a single block and block id 0 for every
row (a forward hook on the target module, like MELO's own layers), not a second LoRA matmul.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from melo_fast import ops
from melo_fast.patching import find_module
from melo_fast.targets import linear_shape


class SequentialLoRA:
    """Plain LoRA on ``targets`` of ``model``, fine-tuned batch after batch.

    Args:
        model: the model (its own weights stay frozen and untouched).
        targets: module names (suffixes allowed, as in ``MeloConfig.targets``).
        rank: LoRA rank ``r`` of each target.
        scale: output scale ``s``: ``y = W x + s (x A^T) B``; MELO's block scale, so that each rank
            direction moves the output as much as one of MELO's.
        edit_lr, num_iter, scheduler_step, scheduler_gamma: optimizer settings of one edit batch.
        backend: op backend for ``block_lora`` (None: automatic).

    Parameters: ``A [1, r, d_in]`` (kaiming-uniform, a = sqrt(5), as MELO) and ``B [1, r, d_out]``
    (zeros), float32, one pair per target; the model is unchanged until the first edit.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[str],
        rank: int,
        scale: float,
        edit_lr: float,
        num_iter: int,
        scheduler_step: int = 20,
        scheduler_gamma: float = 0.5,
        backend: str | None = None,
    ):
        if rank < 1:
            raise ValueError(f"SequentialLoRA: rank must be >= 1, got {rank}")
        self.model = model
        self.rank = rank
        self.scale = scale
        self.edit_lr = edit_lr
        self.num_iter = num_iter
        self.scheduler_step = scheduler_step
        self.scheduler_gamma = scheduler_gamma
        self.backend = backend
        self.parameters: list[nn.Parameter] = []
        self.handles = []
        self.target_names = []
        for name in targets:
            full_name, module = find_module(model, name, "target")
            d_in, d_out = linear_shape(module)
            device = module.weight.device
            A = torch.empty(1, rank, d_in, device=device)
            nn.init.kaiming_uniform_(A[0], a=math.sqrt(5))
            A = nn.Parameter(A)
            B = nn.Parameter(torch.zeros(1, rank, d_out, device=device))
            self.parameters += [A, B]
            self.handles.append(module.register_forward_hook(self._hook(A, B, d_in, d_out)))
            self.target_names.append(full_name)

    def _hook(self, A: nn.Parameter, B: nn.Parameter, d_in: int, d_out: int):
        block0 = torch.zeros(1, dtype=torch.int64, device=A.device)

        def hook(module, args, output):
            # Every row uses the one LoRA: treat the whole input as one sample with block 0.
            x = args[0].reshape(1, -1, d_in)
            dtype = output.dtype
            y = ops.block_lora(
                x.to(dtype), A.to(dtype), B.to(dtype), block0, self.scale,
                base=output.reshape(1, -1, d_out), backend=self.backend,
            )
            return y.reshape(output.shape)

        return hook

    def edit(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Fine-tune the LoRA on one edit batch; returns the final loss. The model's weights stay frozen."""
        was_training = self.model.training
        self.model.eval()  # dropout off, as in MELO's edit
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        try:
            optimizer = torch.optim.Adam(self.parameters, lr=self.edit_lr)
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=self.scheduler_step, gamma=self.scheduler_gamma
            )
            loss_value = float("nan")
            for _ in range(self.num_iter):
                optimizer.zero_grad(set_to_none=True)
                loss = self.model(**batch).loss
                loss_value = loss.item()
                if not torch.isfinite(loss):
                    break  # a diverged baseline is a result, not a crash: keep the last parameters
                loss.backward()
                optimizer.step()
                scheduler.step()
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
            self.model.train(was_training)
        return loss_value

    def remove(self) -> None:
        """Detach the LoRA: the model is exactly as before."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

