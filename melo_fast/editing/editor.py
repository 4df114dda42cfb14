"""MeloEditor: edits one patched model, one batch (one new block) at a time, while it serves.

Two ways to edit:

- ``editor.edit(batch)``: MELO's loop (Adam + StepLR over the new block; ``training.py``), stopped once
  the edit has converged, over the batch extended by the unedited model's continuation after each
  target for decoder-only models (``continuation.py``).
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
:class:`~melo_fast.routing.EditState`. :meth:`reload` swaps in a saved edit state the same way. One
edit at a time per model: ``edit()`` calls from several threads queue; ``open_block`` refuses while
another block is open.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from melo_fast import ops
from melo_fast.config import MeloConfig, TrainSettings
from melo_fast.editing import calibration
from melo_fast.editing.batch import EditBatch
from melo_fast.editing.block import OpenBlock
from melo_fast.editing.continuation import target_then_continuation_loss, with_continuation
from melo_fast.editing.persistence import EditStateIO
from melo_fast.editing.prefixed_rows import prefix_token_ids, with_prefixes
from melo_fast.editing.result import EditResult
from melo_fast.editing.training import loss_of, train_block
from melo_fast.routing import BlockLoRAHook, EditState, RefusesCopy, RouterHook, Routing
from melo_fast.routing.keys import read_keys
from melo_fast.targets import ModelKind
from melo_fast.vecdb import COINCIDE_FRACTION, InsertCounts, VectorDatabase, coinciding_conflicts
from melo_fast.vecdb.wordings import check_paraphrase_of, wording_radii


class MeloEditor(EditStateIO, RefusesCopy):
    """The editing handle of one patched model (returned by :func:`melo_fast.patch`).

    Attributes:
        model: the patched model. config: what it was patched with. kind: what kind of model it is.
        routing: its routing (the published edit state, per-thread calls). router: the router's hook.
        lora_layers: target name → its :class:`~melo_fast.routing.BlockLoRAHook`.
        tokenizer: used to measure the key scale (``init_radius="auto"``), or None.

    Once :func:`melo_fast.unpatch` (:meth:`close`) has detached it from the model, every method that
    needs the model's hooks raises a RuntimeError saying so; :meth:`save` and :meth:`export_peft` still
    write its committed edits (they read only those and the model's module names).

    ``blocks``, ``save``, ``reload``, ``restore``, ``replace_state``, ``use_key_projection``, ``export_peft``
    and ``adapter_names`` come from :class:`~melo_fast.editing.persistence.EditStateIO` (``persistence.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MeloConfig,
        routing: Routing,
        router: RouterHook,
        lora_layers: dict[str, BlockLoRAHook],
        kind: ModelKind,
        detach: Callable[[], None],
        tokenizer=None,
    ):
        self.model = model
        self._config = config
        self.routing = routing
        self.router = router
        self.lora_layers = lora_layers
        self.kind = kind
        self.tokenizer = tokenizer
        self._detach = detach  # removes what melo_fast.patch attached (close())
        self._closed = False
        self._open: OpenBlock | None = None
        # Serializes edits, commits and reloads of this model (an RLock: edit() holds it around
        # open_block/commit). Inference never takes it.
        self._lock = threading.RLock()

    @property
    def config(self) -> MeloConfig:
        """What the model is patched with, and how the next edit trains (a frozen :class:`MeloConfig`)."""
        return self._config

    @config.setter
    def config(self, config: MeloConfig) -> None:
        """Train the next edits with other settings: ``editor.config = editor.config.replace(num_iter=10)``.

        Only the training settings (:class:`~melo_fast.config.TrainSettings`) may change: the hooks,
        the blocks and the database were made for the rest. Waits for an edit in progress.

        Raises:
            TypeError: ``config`` is not a MeloConfig.
            ValueError: another field differs (the message names it); nothing changes.
        """
        if not isinstance(config, MeloConfig):
            raise TypeError(
                f"melo_fast: editor.config takes a MeloConfig (editor.config.replace(...)), got {type(config).__name__}"
            )
        trainable = {f.name for f in dataclasses.fields(TrainSettings)}
        fixed = [
            f"MeloConfig.{f.name} ({getattr(self._config, f.name)!r} -> {getattr(config, f.name)!r})"
            for f in dataclasses.fields(MeloConfig)
            if f.name not in trainable and getattr(config, f.name) != getattr(self._config, f.name)
        ]
        if fixed:
            raise ValueError(
                f"melo_fast: {', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} fixed while the model is "
                f"patched; a live editor takes new training settings only ({', '.join(sorted(trainable))}). "
                "For the others patch anew: melo_fast.unpatch(model), then melo_fast.patch(model, config)"
            )
        with self._lock:
            self._config = config

    @property
    def state(self) -> EditState:
        """The published edit state (database + blocks); replaced, never modified, by commit/reload."""
        return self.routing.published

    @property
    def db(self) -> VectorDatabase:
        """The vector database (``len(editor.db)`` keys; ``editor.db.stats()``)."""
        return self.routing.published.database

    @property
    def num_blocks(self) -> int:
        return self.routing.published.num_blocks

    @property
    def block_is_open(self) -> bool:
        return self._open is not None

    def disabled(self):
        """Context manager: inside it (in this thread) the model is exactly the unedited model."""
        return self.routing.disable()

    def edit_batch(self, batch: Mapping[str, torch.Tensor]) -> EditBatch:
        """``batch`` checked as an edit batch of this model (see :meth:`open_block`), with its edit targets.

        Raises:
            TypeError / ValueError: as :meth:`EditBatch.check <melo_fast.editing.batch.EditBatch.check>`.
        """
        return EditBatch.check(batch, self.kind, next(self.model.parameters()).device)

    # --- the low-level path -------------------------------------------------------------------
    def open_block(
        self, batch: Mapping[str, torch.Tensor], freeze_model: bool = True, paraphrase_of: Sequence[int] | None = None
    ) -> list[nn.Parameter]:
        """Start a new block for ``batch`` and return its trainable parameters.

        Reads the batch's keys (a forward pass that stops at the router, in eval mode and without
        gradient) and the edit labels. Until :meth:`commit` or :meth:`abort`, every forward call *of
        this thread* routes all samples to the new block; other threads keep the committed model.

        Args:
            batch: the dict the model takes, with HF-style ``labels`` (``[N, T]`` token ids with -100
                on the prompt for causal LMs, ``[N, T_dec]`` for seq2seq, ``[N]`` for classifiers).
            freeze_model: switch off ``requires_grad`` of the model's own parameters until the block
                is closed, so optimizers built from ``model.parameters()`` train only the block.
            paraphrase_of: None (MELO: every row is an edit of its own), or per row the row of the prompt it
                is another wording of (a prompt's own index). The commit then inserts the keys of a prompt
                with paraphrases, and theirs, with the key projection's radius for that many paraphrases when
                it has one (:mod:`melo_fast.vecdb.wordings`); ``edit_texts(..., paraphrases=...)`` fills it in.

        Raises:
            RuntimeError: a block is already open (in any thread).
            ValueError: a bad batch, a bad ``paraphrase_of`` (the message names the row), or two rows that
                are the same input with different targets.

        If opening fails half-way (say, out of memory), the model's parameters are unfrozen again and
        no block stays open.
        """
        with self._lock:
            self._check_attached()
            if self._open is not None:
                raise RuntimeError("melo_fast: a block is already open; commit() or abort() it first")
            checked = self.edit_batch(batch)
            if paraphrase_of is not None:
                paraphrase_of = [int(row) if isinstance(row, torch.Tensor) else row for row in paraphrase_of]
                check_paraphrase_of(paraphrase_of, checked.targets)
            radius, scale = self._radius()
            keys = self.keys(batch)
            targets = checked.targets
            clashes = coinciding_conflicts(keys, targets, COINCIDE_FRACTION * radius)
            if clashes:
                raise ValueError(
                    f"melo_fast: edit rows {clashes} are the same input with different targets; one block "
                    "cannot hold both. Keep one target per input (edit the other in a later batch: the later edit wins)"
                )
            key_radii = None if paraphrase_of is None else wording_radii(paraphrase_of, self._radius_for(radius))
            block = OpenBlock(keys, targets, radius, scale, key_radii)
            block.open(self.model, self.routing, self.lora_layers, freeze_model)
            self._open = block
            return list(block.parameters)

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
            state = self.routing.published
            block_id = state.num_blocks
            database = state.database.copy()
            database.init_radius, database.key_scale = self._open.radius, self._open.key_scale
            # open_block refused clashing rows already, at this radius: no second scan of the batch.
            opened = self._open
            counts = database.insert(opened.keys, opened.targets, block_id, refuse_clashes=False,
                                     radii=opened.key_radii)
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
            self.routing.published = EditState(database, blocks, block_id + 1, state.projection)  # the atomic publish
            self._close_block()
            return block_id, counts

    def abort(self) -> None:
        """Drop the open block: the database and every earlier block stay exactly as they were.

        Raises:
            RuntimeError: no block is open, or another thread opened it.
        """
        with self._lock:
            self._check_opener("abort")
            self._close_block()

    def close(self) -> None:
        """Remove everything :func:`melo_fast.patch` attached: the model is then exactly as before patching.

        A block this thread opened is aborted first. :func:`melo_fast.unpatch` calls this; afterwards the
        editor can only save or export its committed edits (class docstring).

        Raises:
            RuntimeError: another thread has a block open (it may be training it right now: let it
                commit or abort first), or the editor was closed already.
        """
        with self._lock:  # no edit can start between the check and the removal
            if self._closed:
                raise RuntimeError("melo_fast: this editor is closed already (unpatch() or close() detached it)")
            if self._open is not None:
                self.abort()
            self._detach()
            self._closed = True

    def _check_attached(self) -> None:
        """Everything that reads or changes the model needs its hooks, which close() removed."""
        if self._closed:
            raise RuntimeError(
                "melo_fast: this editor was detached from its model by unpatch() (or close()); it can still save() "
                "its committed edits. To edit or route again, attach a new editor: melo_fast.load(model, path) "
                "with a save of these edits, or melo_fast.patch(model)"
            )

    def _check_opener(self, action: str) -> None:
        self._check_attached()
        if self._open is None:
            raise RuntimeError("melo_fast: no block is open; call editor.open_block(batch) first")
        if self._open.thread != threading.get_ident():
            # The opener's forwards may be using the block right now; closing it under them would
            # fail their training step half-way.
            raise RuntimeError(
                f"melo_fast: the open block belongs to another thread; {action}() it from the thread that "
                "called open_block()"
            )

    def _close_block(self) -> None:
        self._open.close(self.routing, self.lora_layers)
        self._open = None

    # --- MELO's editing loop ------------------------------------------------------------------
    def edit(self, batch: Mapping[str, torch.Tensor], paraphrase_of: Sequence[int] | None = None) -> EditResult:
        """Edit the model with one batch: train a new block, then route the batch's keys to it.

        The model is put in eval mode during the edit (dropout off) and restored after. Works when
        called under ``torch.no_grad()`` or ``torch.inference_mode()`` (a serving loop): it turns
        gradients on for itself. If anything fails (a non-finite loss, an exception, Ctrl-C) the edit
        is dropped and nothing changes. Other threads may run inference meanwhile (module docstring).

        Args:
            batch: as for :meth:`open_block` (``input_ids``/``attention_mask`` ``[N, T]`` int64 and
                HF-style ``labels``), on the model's device.
            paraphrase_of: as for :meth:`open_block`: which rows are other wordings of which prompt (None:
                every row its own edit, MELO).

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
                parameters = self.open_block(batch, paraphrase_of=paraphrase_of)
                try:
                    settings = self.config.train_settings
                    training_batch, loss_fn = batch, loss_of  # keys and edit targets: the batch as given
                    if settings.prefix_rows and self.kind.causal_lm:
                        training_batch = self._with_prefixes(batch, settings.prefix_rows)
                    if settings.continuation_tokens and self.kind.causal_lm:
                        rows = training_batch
                        with self.routing.disable():
                            training_batch = with_continuation(self.model, rows, settings.continuation_tokens)
                        loss_fn = target_then_continuation_loss(rows, training_batch)
                    targets = [m for name, m in self.model.named_modules() if name in self.lora_layers]
                    trained = train_block(
                        self.model, training_batch, parameters, settings, targets,
                        lambda: self.routing.training, self.kind.causal_lm, loss_fn,
                    )
                    block_id, counts = self.commit()
                except BaseException:
                    if self._open is not None:
                        self.abort()
                    raise
            finally:
                self.model.train(was_training)
        return EditResult(
            block_id=block_id,
            loss=trained.loss,
            keys=batch["labels"].shape[0],
            new_clusters=counts.new_clusters,
            merged=counts.merged,
            conflicts=counts.conflicts,
            forgotten=counts.forgotten,
            superseded=counts.superseded,
            steps=trained.steps,
            seconds=time.perf_counter() - start,
        )

    def _with_prefixes(self, batch: Mapping[str, torch.Tensor], copies: int) -> dict[str, torch.Tensor]:
        """``batch`` plus ``copies`` prefixed training copies of each row (``MeloConfig.prefix_rows``)."""
        tokenizer = self.tokenizer or calibration.local_tokenizer(self.model)
        if tokenizer is None:
            raise ValueError(
                "melo_fast: MeloConfig.prefix_rows tokenizes its prefixes and needs the model's tokenizer: "
                "melo_fast.patch(model, tokenizer=tokenizer), or edit with editor.edit_texts(...)"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        return with_prefixes(batch, prefix_token_ids(tokenizer), copies, pad, tokenizer.bos_token_id)

    def edit_texts(
        self,
        prompts: list[str],
        targets: list,
        tokenizer,
        max_length: int | None = None,
        paraphrases: list[list[str]] | None = None,
    ) -> EditResult:
        """Tokenize ``prompts`` → ``targets`` into an edit batch (see :func:`~melo_fast.editing.build_edit_batch`)
        and edit.

        The tokenizer is remembered for measuring the key scale (``init_radius="auto"``).

        Args:
            prompts: the questions to edit, ``N`` non-empty strings.
            targets: their answers, ``N`` strings (for a classifier: label names or class ids).
            tokenizer: the model's tokenizer.
            max_length: truncate every prompt (and paraphrase) to that many tokens.
            paraphrases: None, or ``N`` lists (``[]`` for none) of other wordings of each prompt, written by
                you: ``paraphrases[i][j]`` is one more row of this edit with target ``targets[i]``. The block
                trains on it and its key joins the database with that target (the edit's keys with the key
                projection's radius for that many paraphrases if it has one: :mod:`melo_fast.vecdb.wordings`), so the
                edit also answers that wording and inputs whose keys fall near one of the edit's wordings; an
                edit of the prompt alone reaches few paraphrases.
                Rows: the ``N`` prompts first, then the paraphrases in order (row numbers in errors of
                :meth:`edit` count this way).

        Returns:
            What :meth:`edit` returns; ``keys`` counts every row (prompts and paraphrases).

        Raises:
            TypeError: ``prompts``, ``targets`` or ``paraphrases`` is not a list, an entry of ``paraphrases``
                is not a list, a paraphrase or a target is not text (for a classifier: a target not a label
                name or a class id); the message names the row.
            ValueError: no prompts, a different number of targets or paraphrase lists, an empty prompt, target
                or paraphrase, or a paraphrase that repeats a prompt or paraphrase of the batch (the message
                names it); and everything :meth:`edit` raises. All of these before any training.
        """
        self._check_attached()
        batch = EditBatch.from_texts(self.model, prompts, targets, tokenizer, max_length, paraphrases)
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        if not paraphrases or not any(paraphrases):
            return self.edit(dict(batch.inputs))
        # The rows are the prompts, then each prompt's paraphrases in order (EditBatch.from_texts).
        paraphrase_of = list(range(len(prompts))) + [i for i, wordings in enumerate(paraphrases) for _ in wordings]
        return self.edit(dict(batch.inputs), paraphrase_of=paraphrase_of)

    def warmup(self, training: bool = True) -> int:
        """Compile the Triton kernels this model will launch, now rather than on a serving request.

        On CUDA each kernel variant compiles on its first launch; the variants depend only on the
        targets' shapes and dtypes, so one call covers every later batch size, bank size and database
        size. :func:`melo_fast.patch` calls it for models on CUDA. A no-op (returns 0) on CPU, without
        Triton, or with a non-Triton ``backend``.

        Args:
            training: also compile the backward kernels (editing).

        Returns:
            The number of warm-up calls made.
        """
        self._check_attached()
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
            self._check_attached()
            if tokenizer is not None:
                self.tokenizer = tokenizer
            radius, scale = self._radius()
            state = self.routing.published
            database = state.database.copy()
            database.init_radius, database.key_scale = radius, scale
            self.routing.published = dataclasses.replace(state, database=database)
            return radius

    def _radius_for(self, radius: float) -> Callable[[int], float]:
        """The radius of an edit given with ``k`` paraphrases: the key projection's (``radius_for``) with
        ``init_radius="auto"``, else ``radius`` (the radius of every edit); ``radius`` for ``k = 0``."""
        projection = self.routing.published.projection
        if projection is None or self.config.init_radius != "auto":
            return lambda k: radius
        return lambda k: projection.radius_for(k) if k else radius

    def _radius(self) -> tuple[float, float | None]:
        """``(init_radius, key_scale)`` for the next commit: the database's, or measured now."""
        state = self.routing.published
        database = state.database
        if database.init_radius is not None:
            return database.init_radius, database.key_scale
        if state.projection is not None and self.config.init_radius == "auto":
            return state.projection.radius, None  # chosen when the projection was trained (key_projection.py)
        tokenizer = self.tokenizer or calibration.local_tokenizer(self.model)
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

    # --- routing ------------------------------------------------------------------------------
    def keys(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, d]`` float32 keys of ``inputs``: an eval-mode, no-grad forward that stops at the router.

        The model sees ``inputs`` exactly as given, so the keys are those of ``model(**inputs)``. On a
        left-padded batch a model with absolute positions (GPT-2) needs ``position_ids`` to see what
        ``generate()`` gives it: ``(attention_mask.cumsum(-1) - 1).clamp(min=0)`` (a warning says so once).
        """
        self._check_attached()
        return read_keys(self.model, self.routing, self.config.router, inputs)

    def route(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N]`` int64 block each input uses in ``model(**inputs)`` (-1: no edit applies); see :meth:`keys`."""
        return self.db.search(self.keys(inputs), backend=self.config.backend)

    def __repr__(self) -> str:
        return (
            f"MeloEditor(router={self.config.router!r}, targets={self.config.targets}, "
            f"blocks={self.num_blocks}, keys={len(self.db)})"
        )
