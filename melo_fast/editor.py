"""MeloEditor: edits one patched model, one batch (one new block) at a time.

Two ways to edit:

- ``editor.edit(batch)``: MELO's own loop (Adam + StepLR over the new block, ``num_iter`` steps).
- The low-level path for your own training loop (your optimizer, scheduler, AMP, HF Trainer)::

      editor.open_block(batch)            # reads the batch's keys; only the new block is trainable
      for step in ...:                    # every forward now routes all samples to the new block
          loss = model(**batch).loss; loss.backward(); optimizer.step(); ...
      editor.commit()                     # stores the block and inserts the keys (or editor.abort())

``edit()`` is built on exactly that path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from melo_fast.config import MeloConfig
from melo_fast.layers import BlockLoRALinear, RouterLayer
from melo_fast.routing import KeysCaptured, Routing
from melo_fast.vecdb import VectorDatabase


@dataclass
class EditResult:
    """What one edit batch did.

    Attributes:
        block_id: the block trained for this batch.
        loss: the model's loss at the last training step.
        keys: number of keys (samples) in the batch.
        new_clusters / merged / conflicts / forgotten: how the keys entered the database.
        seconds: wall time of the whole edit.
    """

    block_id: int
    loss: float
    keys: int
    new_clusters: int
    merged: int
    conflicts: int
    forgotten: int
    seconds: float


@dataclass
class _OpenBlock:
    keys: torch.Tensor
    labels: list[tuple]
    parameters: list[nn.Parameter]
    frozen: list[nn.Parameter]  # model parameters whose requires_grad was switched off


class MeloEditor:
    """The editing handle of one patched model (returned by :func:`melo_fast.patch`)."""

    def __init__(
        self,
        model: nn.Module,
        config: MeloConfig,
        routing: Routing,
        router: RouterLayer,
        lora_layers: dict[str, BlockLoRALinear],
        handles: list,
        causal_lm: bool,
        seq2seq: bool,
    ):
        self.model = model
        self.config = config
        self.routing = routing
        self.router = router
        self.lora_layers = lora_layers
        self.handles = handles
        self.causal_lm = causal_lm
        self.seq2seq = seq2seq
        self.num_blocks = 0
        self._open: _OpenBlock | None = None

    @property
    def db(self) -> VectorDatabase:
        """The vector database (``len(editor.db)`` keys; ``editor.db.stats()``)."""
        return self.router.database

    @property
    def block_is_open(self) -> bool:
        return self._open is not None

    def disabled(self):
        """Context manager: inside it (in this thread) the model is exactly the unedited model."""
        return self.routing.disable()

    # --- the low-level path -------------------------------------------------------------------
    def open_block(self, batch: Mapping[str, torch.Tensor], freeze_model: bool = True) -> list[nn.Parameter]:
        """Start a new block for ``batch`` and return its trainable parameters.

        Reads the batch's keys (a forward pass that stops at the router, in eval mode and without
        gradient) and the edit labels. Until :meth:`commit` or :meth:`abort`, every forward call
        routes all samples to the new block.

        Args:
            batch: the dict the model takes, with HF-style ``labels`` (``[N, T]`` token ids with -100
                on the prompt for causal LMs, ``[N, T_dec]`` for seq2seq, ``[N]`` for classifiers).
            freeze_model: switch off ``requires_grad`` of the model's own parameters until the block
                is closed, so optimizers built from ``model.parameters()`` train only the block.
        """
        if self._open is not None:
            raise RuntimeError("melo_fast: a block is already open; commit() or abort() it first")
        self._check_batch(batch)
        keys = self.keys(batch)
        labels = self._edit_labels(batch)
        frozen = []
        if freeze_model:
            frozen = [p for p in self.model.parameters() if p.requires_grad]
            for parameter in frozen:
                parameter.requires_grad_(False)
        parameters = [p for layer in self.lora_layers.values() for p in layer.open_block()]
        self._open = _OpenBlock(keys, labels, parameters, frozen)
        self.routing.training = True
        return parameters

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The open block's parameters (A and B of every target), for your optimizer."""
        if self._open is None:
            raise RuntimeError("melo_fast: no block is open; call editor.open_block(batch) first")
        return list(self._open.parameters)

    def commit(self):
        """Store the open block and insert its keys into the database. Returns ``(block_id, InsertCounts)``."""
        if self._open is None:
            raise RuntimeError("melo_fast: no block is open; call editor.open_block(batch) first")
        block_id = self.num_blocks
        for layer in self.lora_layers.values():
            layer.reserve(block_id + 1)
            layer.store_block(block_id)  # writes a slot no routing can reach until num_blocks grows
        counts = self.db.insert(self._open.keys, self._open.labels, block_id)
        self.num_blocks = block_id + 1
        for layer in self.lora_layers.values():
            layer.num_blocks = self.num_blocks
        self._close()
        return block_id, counts

    def abort(self) -> None:
        """Drop the open block: the database and every earlier block stay exactly as they were."""
        if self._open is None:
            raise RuntimeError("melo_fast: no block is open")
        self._close()

    def _close(self) -> None:
        for parameter in self._open.frozen:
            parameter.requires_grad_(True)
        for layer in self.lora_layers.values():
            layer.close_block()
        self.routing.training = False
        self._open = None

    # --- MELO's editing loop ------------------------------------------------------------------
    def edit(self, batch: Mapping[str, torch.Tensor]) -> EditResult:
        """Edit the model with one batch: train a new block, then route the batch's keys to it.

        The model is put in eval mode during the edit (dropout off) and restored after. If anything
        fails (a non-finite loss, an exception, Ctrl-C) the edit is dropped and nothing changes.
        """
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            parameters = self.open_block(batch)
            try:
                optimizer = torch.optim.Adam(parameters, lr=self.config.edit_lr)
                scheduler = torch.optim.lr_scheduler.StepLR(
                    optimizer, step_size=self.config.scheduler_step, gamma=self.config.scheduler_gamma
                )
                loss_value = float("nan")
                for _ in range(self.config.num_iter):
                    optimizer.zero_grad(set_to_none=True)
                    loss = self._loss(batch)
                    loss_value = loss.item()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"melo_fast: edit loss became {loss_value}; the edit was dropped. "
                            "Try a smaller MeloConfig.edit_lr or scale."
                        )
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                block_id, counts = self.commit()
            except BaseException:
                if self._open is not None:
                    self.abort()
                raise
        finally:
            self.model.train(was_training)
        return EditResult(
            block_id=block_id,
            loss=loss_value,
            keys=batch["labels"].shape[0],
            new_clusters=counts.new_clusters,
            merged=counts.merged,
            conflicts=counts.conflicts,
            forgotten=counts.forgotten,
            seconds=time.perf_counter() - start,
        )

    def edit_texts(self, prompts: list[str], targets: list, tokenizer, max_length: int | None = None) -> EditResult:
        """Tokenize ``prompts`` → ``targets`` into an edit batch (see :func:`build_edit_batch`) and edit."""
        batch = build_edit_batch(self.model, prompts, targets, tokenizer, max_length=max_length)
        return self.edit(batch)

    # --- helpers ------------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        output = self.model(**batch)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError("melo_fast: the model returned no loss for the edit batch; does it take `labels`?")
        return loss

    def _check_batch(self, batch) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"melo_fast: an edit batch is the dict the model takes, got {type(batch).__name__}")
        if batch.get("labels") is None:
            raise ValueError(
                "melo_fast: the edit batch has no 'labels'. Add HF-style labels (token ids with -100 on the "
                "prompt for causal LMs, target ids for seq2seq, class ids for classifiers) or use edit_texts()."
            )
        device = next(self.model.parameters()).device
        sizes = set()
        for name, value in batch.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.device != device:
                raise ValueError(
                    f"melo_fast: batch[{name!r}] is on {value.device} but the model is on {device}; "
                    "move the batch with {k: v.to(device) for k, v in batch.items()}"
                )
            if value.dim() == 0:
                raise ValueError(f"melo_fast: batch[{name!r}] is a scalar; every entry needs a batch dimension")
            sizes.add(value.shape[0])
        if sizes == {0}:
            raise ValueError("melo_fast: the edit batch is empty")
        if len(sizes) != 1:
            raise ValueError(f"melo_fast: batch entries disagree on the batch size: {sorted(sizes)}")
        labels = batch["labels"]
        if self.causal_lm and labels.dim() == 2:
            empty_rows = (labels != -100).sum(dim=1) == 0
            if bool(empty_rows.any()):
                rows = empty_rows.nonzero().flatten().tolist()
                raise ValueError(f"melo_fast: edit rows {rows} have no target tokens (all labels are -100)")

    def keys(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, d]`` float32 keys of ``inputs``: an eval-mode, no-grad forward that stops at the router."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.routing.capture_keys():
                self.model(**inputs)
        except KeysCaptured:
            return self.routing.call.keys
        finally:
            self.model.train(was_training)
        raise RuntimeError(f"melo_fast: the router {self.config.router!r} did not run in the model's forward pass")

    def route(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N]`` int64 block each input would use (-1: no edit applies). Handy to see which edit fires."""
        return self.db.search(self.keys(inputs), backend=self.config.backend)

    def _edit_labels(self, batch) -> list[tuple]:
        """The edit target of each sample as a tuple (compared exactly by the database)."""
        labels = batch["labels"]
        if labels.dim() == 1:
            return [(value,) for value in labels.tolist()]
        return [tuple(v for v in row if v != -100) for row in labels.reshape(labels.shape[0], -1).tolist()]

    def save(self, path) -> None:
        """Write the whole edit state (config, blocks, database) to folder ``path``, atomically."""
        from melo_fast.io import save

        save(self, path)

    def __repr__(self) -> str:
        return (
            f"MeloEditor(router={self.config.router!r}, targets={self.config.targets}, "
            f"blocks={self.num_blocks}, keys={len(self.db)})"
        )


def build_edit_batch(model: nn.Module, prompts: list[str], targets: list, tokenizer, max_length: int | None = None):
    """The edit batch for ``prompts`` → ``targets``, on the model's device.

    - causal LMs: ``prompt + " " + target`` right-padded; labels are -100 on the prompt and padding;
    - seq2seq: encoder inputs from the prompts, decoder labels from the targets (-100 on padding);
    - classifiers: ``targets`` are class ids or label names (``model.config.label2id``).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"melo_fast: {len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("melo_fast: no prompts to edit")
    config = model.config
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if config.is_encoder_decoder:
        inputs = tokenizer(
            list(prompts), padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
        )
        labels = tokenizer(list(targets), padding=True, return_tensors="pt").input_ids
        labels[labels == pad_id] = -100
        batch = {**inputs, "labels": labels}
    elif model.can_generate():
        rows = []
        for prompt, target in zip(prompts, targets, strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            target_ids = tokenizer(" " + str(target).lstrip(), add_special_tokens=False)["input_ids"]
            rows.append((prompt_ids, target_ids))
        length = max(len(p) + len(t) for p, t in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (prompt_ids, target_ids) in enumerate(rows):
            ids = prompt_ids + target_ids
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, len(prompt_ids) : len(ids)] = torch.tensor(target_ids)
            attention_mask[i, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    else:
        label2id = getattr(config, "label2id", {}) or {}
        class_ids = [label2id[t] if isinstance(t, str) else int(t) for t in targets]
        inputs = tokenizer(
            list(prompts), padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
        )
        batch = {**inputs, "labels": torch.tensor(class_ids, dtype=torch.long)}
    return {name: value.to(device) for name, value in batch.items()}
