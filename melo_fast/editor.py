"""MeloEditor: edits one patched model, one batch (one new block) at a time, while it serves.

Two ways to edit:

- ``editor.edit(batch)``: MELO's own loop (Adam + StepLR over the new block, ``num_iter`` steps).
- The low-level path for your own training loop (your optimizer, scheduler, AMP, HF Trainer)::

      editor.open_block(batch)            # reads the batch's keys; only the new block is trainable
      for step in ...:                    # this thread's forwards route all samples to the new block
          loss = model(**batch).loss; loss.backward(); optimizer.step(); ...
      editor.commit()                     # stores the block and inserts the keys (or editor.abort())

``edit()`` is built on exactly that path.

Concurrency contract (DESIGN §2.11): the model may serve inference from any number of threads while
one thread edits. An open block is visible only to the thread that opened it; every other thread
keeps getting the committed model (unrelated outputs bit for bit, the edited input its old output)
until :meth:`commit` publishes the new block and the new database together as one immutable
:class:`~melo_fast.state.EditState`. :meth:`reload` swaps in a saved edit state the same way. One
edit at a time per model: ``edit()`` calls from several threads queue; ``open_block`` refuses while
another block is open.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from melo_fast import calibration, checkpoint, export, ops
from melo_fast.config import MeloConfig
from melo_fast.layers import BlockLoRALinear, RouterLayer
from melo_fast.routing import KeysCaptured, Routing
from melo_fast.state import EditState
from melo_fast.vecdb import COINCIDE_FRACTION, InsertCounts, VectorDatabase, coinciding_conflicts


@dataclass
class EditResult:
    """What one edit batch did.

    Attributes:
        block_id: the block trained for this batch.
        loss: the model's loss at the last training step.
        keys: number of keys (samples) in the batch.
        new_clusters / merged / conflicts / forgotten / superseded: how the keys entered the database
            (``superseded``: earlier edits of the same inputs that this batch replaced).
        seconds: wall time of the whole edit.
    """

    block_id: int
    loss: float
    keys: int
    new_clusters: int
    merged: int
    conflicts: int
    forgotten: int
    superseded: int
    seconds: float


@dataclass
class _OpenBlock:
    keys: torch.Tensor
    labels: list[tuple]
    parameters: list[nn.Parameter]
    frozen: list[nn.Parameter]  # model parameters whose requires_grad was switched off
    radius: float  # init_radius the commit uses (measured now if "auto" and not yet known)
    key_scale: float | None
    thread: int  # the opener: only its forwards train the block, so only it may commit or abort


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
        tokenizer=None,
    ):
        self.model = model
        self.config = config
        self.routing = routing
        self.router = router
        self.lora_layers = lora_layers
        self.handles = handles
        self.causal_lm = causal_lm
        self.seq2seq = seq2seq
        self.tokenizer = tokenizer
        self._open: _OpenBlock | None = None
        # Serializes edits, commits and reloads of this model (an RLock: edit() holds it around
        # open_block/commit). Inference never takes it.
        self._lock = threading.RLock()

    @property
    def state(self) -> EditState:
        """The published edit state (database + blocks); replaced, never modified, by commit/reload."""
        return self.routing.state

    @property
    def db(self) -> VectorDatabase:
        """The vector database (``len(editor.db)`` keys; ``editor.db.stats()``)."""
        return self.routing.state.database

    @property
    def num_blocks(self) -> int:
        return self.routing.state.num_blocks

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
        gradient) and the edit labels. Until :meth:`commit` or :meth:`abort`, every forward call *of
        this thread* routes all samples to the new block; other threads keep the committed model.

        Args:
            batch: the dict the model takes, with HF-style ``labels`` (``[N, T]`` token ids with -100
                on the prompt for causal LMs, ``[N, T_dec]`` for seq2seq, ``[N]`` for classifiers).
            freeze_model: switch off ``requires_grad`` of the model's own parameters until the block
                is closed, so optimizers built from ``model.parameters()`` train only the block.

        Raises:
            RuntimeError: a block is already open (in any thread).
            ValueError: a bad batch, or two rows that are the same input with different targets.

        If opening fails half-way (say, out of memory), the model's parameters are unfrozen again and
        no block stays open.
        """
        with self._lock:
            if self._open is not None:
                raise RuntimeError("melo_fast: a block is already open; commit() or abort() it first")
            self._check_batch(batch)
            radius, scale = self._radius()
            keys = self.keys(batch)
            labels = self._edit_labels(batch)
            clashes = coinciding_conflicts(keys, labels, COINCIDE_FRACTION * radius)
            if clashes:
                raise ValueError(
                    f"melo_fast: edit rows {clashes} are the same input with different targets; one block "
                    "cannot hold both. Keep one target per input (edit the other in a later batch: the later edit wins)"
                )
            frozen = []
            if freeze_model:
                frozen = [p for p in self.model.parameters() if p.requires_grad]
                for parameter in frozen:
                    parameter.requires_grad_(False)
            self._open = _OpenBlock(keys, labels, [], frozen, radius, scale, threading.get_ident())
            try:
                earlier = self.routing.state.blocks
                self._open.parameters = [
                    p for name, layer in self.lora_layers.items() for p in layer.open_block(earlier[name])
                ]
            except BaseException:
                self._close()  # unfreezes the model and closes the layers opened so far
                raise
            self.routing.start_training()
            return list(self._open.parameters)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The open block's parameters (A and B of every target), for your optimizer."""
        if self._open is None:
            raise RuntimeError("melo_fast: no block is open; call editor.open_block(batch) first")
        return list(self._open.parameters)

    def commit(self) -> tuple[int, InsertCounts]:
        """Store the open block, insert its keys, and publish both at once. Returns ``(block_id, counts)``.

        Raises:
            RuntimeError: no block is open, or another thread opened it (only the opener trains it).
            ValueError: the batch's keys cannot be inserted (nothing changes; the block stays open).
        """
        with self._lock:
            self._check_opener("commit")
            state = self.routing.state
            block_id = state.num_blocks
            database = state.database.copy()
            database.init_radius, database.key_scale = self._open.radius, self._open.key_scale
            # open_block refused clashing rows already, at this radius: no second scan of the batch.
            counts = database.insert(self._open.keys, self._open.labels, block_id, refuse_clashes=False)
            try:
                for layer in self.lora_layers.values():
                    layer.store_block()  # past every published view: no reader sees it yet
                blocks = {name: layer.bank.chunks() for name, layer in self.lora_layers.items()}
            except BaseException:
                # Every bank must hold exactly the published blocks, or the next commit's block id
                # (the published count) would point past a stale block in some banks.
                for layer in self.lora_layers.values():
                    layer.bank.truncate(block_id)
                raise
            self.routing.state = EditState(database, blocks, block_id + 1)  # the atomic publish
            self._close()
            return block_id, counts

    def abort(self) -> None:
        """Drop the open block: the database and every earlier block stay exactly as they were.

        Raises:
            RuntimeError: no block is open, or another thread opened it.
        """
        with self._lock:
            self._check_opener("abort")
            self._close()

    def _check_opener(self, action: str) -> None:
        if self._open is None:
            raise RuntimeError("melo_fast: no block is open; call editor.open_block(batch) first")
        if self._open.thread != threading.get_ident():
            # The opener's forwards may be using the block right now; closing it under them would
            # fail their training step half-way.
            raise RuntimeError(
                f"melo_fast: the open block belongs to another thread; {action}() it from the thread that "
                "called open_block()"
            )

    def _close(self) -> None:
        for parameter in self._open.frozen:
            parameter.requires_grad_(True)
        for layer in self.lora_layers.values():
            layer.close_block()
        self.routing.stop_training()
        self._open = None

    # --- MELO's editing loop ------------------------------------------------------------------
    def edit(self, batch: Mapping[str, torch.Tensor]) -> EditResult:
        """Edit the model with one batch: train a new block, then route the batch's keys to it.

        The model is put in eval mode during the edit (dropout off) and restored after. Works when
        called under ``torch.no_grad()`` or ``torch.inference_mode()`` (a serving loop): it turns
        gradients on for itself. If anything fails (a non-finite loss, an exception, Ctrl-C) the edit
        is dropped and nothing changes. Other threads may run inference meanwhile (module docstring).

        Args:
            batch: as for :meth:`open_block` (``input_ids``/``attention_mask`` ``[N, T]`` int64 and
                HF-style ``labels``), on the model's device.

        Raises:
            ValueError: a bad batch (missing or empty labels, wrong shapes or device), or two rows
                that are the same input with different targets.
            RuntimeError: this thread already has a block open (commit or abort it first).
            FloatingPointError: the loss became non-finite (the edit is dropped).
        """
        start = time.perf_counter()
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            # Tensors made under inference_mode cannot be saved for backward: use normal copies.
            batch = {k: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v for k, v in batch.items()}
            was_training = self.model.training
            self.model.eval()
            try:
                parameters = self.open_block(batch)
                try:
                    loss_value = self._train(batch, parameters)
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
            superseded=counts.superseded,
            seconds=time.perf_counter() - start,
        )

    def _train(self, batch, parameters) -> float:
        """MELO's optimization of the open block: Adam + StepLR, ``num_iter`` steps. Returns the last loss."""
        settings = self.config.train_settings
        optimizer = torch.optim.Adam(parameters, lr=settings.edit_lr)
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=settings.scheduler_step, gamma=settings.scheduler_gamma
        )
        loss_value = float("nan")
        for _ in range(settings.num_iter):
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
        return loss_value

    def edit_texts(self, prompts: list[str], targets: list, tokenizer, max_length: int | None = None) -> EditResult:
        """Tokenize ``prompts`` → ``targets`` into an edit batch (see :func:`build_edit_batch`) and edit.

        The tokenizer is remembered for measuring the key scale (``init_radius="auto"``).

        Raises:
            TypeError: ``prompts`` or ``targets`` is not a list.
            ValueError: no prompts, a different number of targets, an empty prompt or target; and
                everything :meth:`edit` raises.
        """
        batch = build_edit_batch(self.model, prompts, targets, tokenizer, max_length=max_length)
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        return self.edit(batch)

    def warmup(self, training: bool = True) -> int:
        """Compile the Triton kernels this model will launch, now rather than on a serving request.

        On CUDA each kernel variant compiles on its first launch (about half a second); the variants
        depend only on the targets' shapes and dtypes, so one call covers every later batch size,
        bank size and database size. :func:`melo_fast.patch` calls it for models on CUDA. A no-op
        (returns 0) on CPU, without Triton, or with a non-Triton ``backend``.

        Args:
            training: also compile the backward kernels (editing).

        Returns:
            The number of warm-up calls made.
        """
        if self.config.backend not in (None, "triton"):
            return 0
        # Targets may differ in dtype or device (a model split over GPUs): warm each group up where it runs.
        groups: dict[tuple, list] = {}
        for layer in self.lora_layers.values():
            groups.setdefault((layer.bank.dtype, layer.bank.device), []).append((layer.d_in, layer.d_out, layer.rank))
        return sum(
            ops.warmup(shapes, self.db.dim, dtype=dtype, device=device, training=training)
            for (dtype, device), shapes in groups.items()
        )

    # --- the radius ---------------------------------------------------------------------------
    def calibrate(self, tokenizer=None) -> float:
        """Measure the key scale on the built-in neutral prompts and fix ``init_radius`` now.

        Only does work with ``init_radius="auto"`` (the default) before the radius is known; the first
        ``edit``/``open_block`` measures it otherwise, so call this to pay that cost up front (at
        start-up rather than on the first edit). Publishes a new state with the same blocks and keys
        and the radius recorded in its database. Returns the radius.

        Raises:
            ValueError: no tokenizer (given here, to :func:`melo_fast.patch`, or found beside the
                model), or neutral-prompt keys whose median distance is 0 or not finite (no scale to measure).
        """
        with self._lock:
            if tokenizer is not None:
                self.tokenizer = tokenizer
            radius, scale = self._radius()
            state = self.routing.state
            database = state.database.copy()
            database.init_radius, database.key_scale = radius, scale
            self.routing.state = EditState(database, state.blocks, state.num_blocks)
            return radius

    def _radius(self) -> tuple[float, float | None]:
        """``(init_radius, key_scale)`` for the next commit: the database's, or measured now."""
        database = self.routing.state.database
        if database.init_radius is not None:
            return database.init_radius, database.key_scale
        tokenizer = self.tokenizer or _local_tokenizer(self.model)
        if tokenizer is None:
            raise ValueError(
                'melo_fast: init_radius="auto" measures this model\'s key scale on built-in neutral prompts and '
                "needs its tokenizer: melo_fast.patch(model, tokenizer=tokenizer), editor.calibrate(tokenizer) or "
                "editor.edit_texts(...); or set an absolute radius, MeloConfig(init_radius=...)"
            )
        device = next(self.model.parameters()).device
        keys = torch.cat([self.keys(inputs) for inputs in calibration.neutral_inputs(tokenizer, device)])
        scale = calibration.key_scale(keys)
        return self.config.radius_policy.from_key_scale(scale), scale

    # --- helpers ------------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        output = self.model(**batch)
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is None:
            raise ValueError("melo_fast: the model returned no loss for the edit batch; does it take `labels`?")
        return loss

    def _check_batch(self, batch) -> None:
        """Every check a batch needs before any work: type, device, sizes, and labels that supervise."""
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
        _check_labels(batch["labels"], batch.get("input_ids"), self.causal_lm, self.seq2seq)

    def keys(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, d]`` float32 keys of ``inputs``: an eval-mode, no-grad forward that stops at the router.

        For decoder-only models a left-padded batch gets ``position_ids`` from its attention mask, as
        ``generate()`` derives them, so the keys are the ones generation will route with.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"melo_fast: keys()/route() take the dict the model takes (e.g. tokenizer(..., return_tensors='pt')), "
                f"got {type(inputs).__name__}"
            )
        inputs = self._with_generation_positions(inputs)
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

    def _with_generation_positions(self, inputs: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        mask = inputs.get("attention_mask")
        if not self.causal_lm or mask is None or "position_ids" in inputs or mask.dim() != 2 or mask.shape[1] == 0:
            return inputs
        if bool(mask[:, 0].all()) or not _accepts(self.model, "position_ids"):
            return inputs  # no left padding: the default positions are generate()'s
        positions = mask.long().cumsum(-1) - 1
        return {**inputs, "position_ids": positions.masked_fill(mask == 0, 1)}

    def route(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N]`` int64 block each input would use (-1: no edit applies). Handy to see which edit fires."""
        return self.db.search(self.keys(inputs), backend=self.config.backend)

    def _edit_labels(self, batch) -> list[tuple]:
        """The edit target of each sample as a tuple (compared exactly by the database)."""
        labels = batch["labels"]
        if labels.dim() == 1:
            return [(value,) for value in labels.tolist()]
        return [tuple(v for v in row if v != -100) for row in labels.reshape(labels.shape[0], -1).tolist()]

    # --- persistence --------------------------------------------------------------------------
    def blocks(self, device: torch.device | str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every target's committed blocks: name → ``(A [n, k, d_in], B [n, k, d_out])`` in the model's dtype.

        Block ``b`` of a target adds ``scale * (x @ A[b].T) @ B[b]`` to its output. Views of the
        bank when it is one buffer on ``device`` (do not modify them), fresh tensors otherwise.

        Args:
            device: where to gather them; None: the bank's device. ``"cpu"`` gathers a bank held
                in several buffers on the host, without a second copy of it on the GPU.
        """
        return self._blocks_of(self.routing.state, device)

    def _blocks_of(self, state: EditState, device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        blocks = {}
        for name, chunks in state.blocks.items():
            layer = self.lora_layers[name]
            if not chunks:
                like = {"dtype": layer.bank.dtype, "device": device or layer.bank.device}
                blocks[name] = tuple(torch.empty(0, layer.rank, d, **like) for d in (layer.d_in, layer.d_out))
            elif len(chunks) == 1:
                blocks[name] = (chunks[0].A.to(device), chunks[0].B.to(device))
            else:
                blocks[name] = tuple(torch.cat([getattr(c, m).to(device) for c in chunks]) for m in ("A", "B"))
        return blocks

    def save(self, path) -> None:
        """Write the whole edit state (config, blocks, database) to folder ``path``.

        Never destroys data: refuses a file or a non-empty folder that is not a melo_fast save, and
        replaces an earlier save atomically (see ``melo_fast.checkpoint``). Other threads may keep
        serving, and one may be editing, meanwhile: the save holds the committed edits only (a block
        still open is not in it).

        Raises:
            FileExistsError: ``path`` is a file, or a folder holding data that is not a melo_fast save
                (nothing is written).
            ValueError: ``path`` is an earlier save whose config names a weights file melo_fast does
                not write (``../x``, an absolute path): it is neither read nor deleted.
        """
        state = self.routing.state  # one snapshot: database and blocks belong together
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        checkpoint.write(path, self.config, state.database, self._blocks_of(state, "cpu"), model_type)

    def reload(self, path) -> None:
        """Replace this editor's edit state (blocks and database) with the one saved in ``path``.

        Atomic while other threads run inference: one publish, as a commit. The save must come from
        a model patched the same way (router, targets, rank, key position, scale, shapes); otherwise
        a clear error and the state is unchanged. This is how edits trained in one process reach
        the processes that serve.

        Raises:
            FileNotFoundError: no melo_fast save at ``path``.
            ValueError: the save is corrupt or was made with another patch (the message names what differs).
            RuntimeError: a block is open (commit or abort it first).
        """
        saved = checkpoint.read(path)
        different = self.config.patch_spec.differences(saved.config.patch_spec)
        if different:
            details = ", ".join(different)
            raise ValueError(f"melo_fast: cannot reload {path}: it was made with another patch ({details})")
        self.replace_state(saved.database, saved.blocks)

    def replace_state(self, database: VectorDatabase, blocks: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Publish an edit state built elsewhere (what :meth:`reload` does once it has read a save).

        Args:
            database: a vector database with this router's key width (copied to the model's device).
            blocks: every target name → ``(A [n, k, d_in], B [n, k, d_out])``, the same ``n`` for all
                targets, and every block id of ``database`` below ``n``.

        Raises ValueError (state unchanged) when anything does not fit this model.
        """
        with self._lock:
            if self._open is not None:
                raise RuntimeError("melo_fast: commit() or abort() the open block before replacing the edit state")
            if database.dim != self.db.dim:
                raise ValueError(
                    f"melo_fast: the database has key width {database.dim}, but this model's router "
                    f"{self.config.router!r} gives {self.db.dim}: it belongs to another model"
                )
            if set(blocks) != set(self.lora_layers):
                raise ValueError(
                    f"melo_fast: blocks are given for {sorted(blocks)}, the targets are {sorted(self.lora_layers)}"
                )
            counts = {A.shape[0] for A, _ in blocks.values()}
            if len(counts) != 1:
                raise ValueError(f"melo_fast: the targets have different block counts {sorted(counts)}")
            num_blocks = counts.pop()
            for name, (A, B) in blocks.items():
                layer = self.lora_layers[name]
                expected_A, expected_B = (num_blocks, layer.rank, layer.d_in), (num_blocks, layer.rank, layer.d_out)
                if tuple(A.shape) != expected_A or tuple(B.shape) != expected_B:
                    raise ValueError(
                        f"melo_fast: blocks of {name!r} have shapes {tuple(A.shape)}/{tuple(B.shape)}, this model "
                        f"needs {expected_A}/{expected_B}: they belong to another model"
                    )
            highest = int(database.point_blocks.max()) if len(database) else -1
            if highest >= num_blocks:
                raise ValueError(f"melo_fast: the database routes to block {highest}; there are {num_blocks} blocks")
            device = self.db.device
            banks = {}
            for name, (A, B) in blocks.items():
                bank = self.lora_layers[name].new_bank()
                bank.extend(A.to(bank.device), B.to(bank.device))
                banks[name] = bank
            database = database.copy()
            if database.device != device:
                database = VectorDatabase.from_state_dict(*database.state_dict(), device=device)
            for name, bank in banks.items():
                self.lora_layers[name].bank = bank
            chunks = {name: bank.chunks() for name, bank in banks.items()}
            self.routing.state = EditState(database, chunks, num_blocks)

    # --- serving with other engines (melo_fast.export) --------------------------------------------
    def export_peft(self, path, blocks=None) -> dict[int, str]:
        """Write the committed blocks (or ``blocks``) as PEFT LoRA adapters plus the routing to folder ``path``.

        Atomic and never destructive, like :meth:`save`; see ``melo_fast.export``. Returns
        ``{block_id: adapter_name}``.

        Raises:
            ValueError: a block id out of range or given twice, a patched PEFT model, or targets PEFT
                cannot name alone.
            FileExistsError: ``path`` holds data that is not a melo_fast export (nothing is written).
        """
        return export.export_peft(self, path, blocks)

    def adapter_names(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        """One exported adapter name per row of ``inputs`` (``"__base__"``: no edit applies), for PEFT's
        ``model(**inputs, adapter_names=...)`` or an engine's per-request adapter."""
        return export.adapter_names(self, inputs)

    def __repr__(self) -> str:
        return (
            f"MeloEditor(router={self.config.router!r}, targets={self.config.targets}, "
            f"blocks={self.num_blocks}, keys={len(self.db)})"
        )


def _accepts(model: nn.Module, argument: str) -> bool:
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _local_tokenizer(model: nn.Module):
    """The tokenizer saved beside a model loaded from a local folder, or None (never downloads)."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer there: the caller says what to do
        return None


def _check_labels(labels: torch.Tensor, input_ids: torch.Tensor | None, causal_lm: bool, seq2seq: bool) -> None:
    """Labels must have the model kind's shape and supervise something in every row (ValueError)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError("melo_fast: batch['labels'] must be an integer tensor (token ids or class ids)")
    if causal_lm:
        if input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"melo_fast: causal-LM labels must have input_ids' shape {tuple(input_ids.shape)} (-100 on the "
                f"prompt and padding), got {tuple(labels.shape)}"
            )
        kind = "target tokens (all labels are -100)"
    elif seq2seq:
        if labels.dim() != 2:
            raise ValueError(
                f"melo_fast: seq2seq labels must be [N, T_target] decoder token ids, got shape {tuple(labels.shape)}"
            )
        kind = "target tokens (all labels are -100)"
    else:
        if labels.dim() not in (1, 2):
            raise ValueError(
                "melo_fast: classifier labels must be [N] class ids (or [N, T] per token), "
                f"got shape {tuple(labels.shape)}"
            )
        kind = "class id (label -100)"
    supervised = (labels != -100).reshape(labels.shape[0], -1).any(dim=1)
    if not bool(supervised.all()):
        rows = (~supervised).nonzero().flatten().tolist()
        raise ValueError(f"melo_fast: edit rows {rows} have no {kind}; every row needs a target")


def build_edit_batch(model: nn.Module, prompts: list[str], targets: list, tokenizer, max_length: int | None = None):
    """The edit batch for ``prompts`` → ``targets``, on the model's device.

    - causal LMs: ``prompt + " " + target`` right-padded; labels are -100 on the prompt and padding;
    - seq2seq: encoder inputs from the prompts, decoder labels from the targets (-100 on padding);
    - classifiers: ``targets`` are class ids or label names (``model.config.label2id``).

    ``max_length`` (optional) truncates every prompt to that many tokens (on the tokenizer's
    truncation side) for every kind of model; targets are never truncated.

    Raises TypeError unless ``prompts`` and ``targets`` are lists (or tuples) of the same length, and
    ValueError naming the index of an empty or whitespace-only prompt or target, or an unknown label.
    """
    for name, value in (("prompts", prompts), ("targets", targets)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"melo_fast: {name} must be a list (one entry per edit), got {type(value).__name__}")
    if len(prompts) != len(targets):
        raise ValueError(f"melo_fast: {len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("melo_fast: no prompts to edit")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"melo_fast: prompt {i} is {prompt!r}; every prompt must be non-empty text")
    for i, target in enumerate(targets):
        if isinstance(target, str) and not target.strip():
            raise ValueError(f"melo_fast: target {i} is {target!r}; every target must be non-empty")
    config = model.config
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if config.is_encoder_decoder:
        inputs = tokenizer(
            list(prompts), padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
        )
        labels = tokenizer([str(t) for t in targets], padding=True, return_tensors="pt").input_ids
        labels[labels == pad_id] = -100
        batch = {**inputs, "labels": labels}
    elif model.can_generate():
        rows = []
        for prompt, target in zip(prompts, targets, strict=True):
            prompt_ids = tokenizer(prompt, truncation=max_length is not None, max_length=max_length)["input_ids"]
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
        batch = {
            **tokenizer(
                list(prompts), padding=True, truncation=max_length is not None, max_length=max_length,
                return_tensors="pt",
            ),
            "labels": torch.tensor(_class_ids(config, targets), dtype=torch.long),
        }
    return {name: value.to(device) for name, value in batch.items()}


def _class_ids(config, targets) -> list[int]:
    """Class ids of ``targets`` (ids, or names looked up in ``config.label2id``); ValueError if unknown."""
    label2id = getattr(config, "label2id", {}) or {}
    num_labels = getattr(config, "num_labels", None)
    ids = []
    for i, target in enumerate(targets):
        if isinstance(target, str):
            if target not in label2id:
                raise ValueError(
                    f"melo_fast: target {i} {target!r} is not a label of this model; valid labels: {sorted(label2id)}"
                )
            ids.append(int(label2id[target]))
        else:
            ids.append(int(target))
        if num_labels is not None and not 0 <= ids[-1] < num_labels:
            raise ValueError(f"melo_fast: target {i} is class {ids[-1]}, but the model has classes 0..{num_labels - 1}")
    return ids
