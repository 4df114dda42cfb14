"""MeloEditor's committed edit state as data: read out, saved, reloaded, replaced, exported to other engines.

:class:`EditStateIO` is a mixin of :class:`~melo_fast.editing.editor.MeloEditor`
(``MeloEditor(EditStateIO, ...)``); its methods are the editor's public ``blocks``, ``save``, ``reload``,
``restore``, ``replace_state``, ``use_key_projection``, ``export_peft`` and ``adapter_names``. The formats
are ``melo_fast.io`` (``checkpoint``, ``export``, ``fingerprint``); checking a state built elsewhere
against the model is ``restore.py``. Reading (``blocks``, ``save``, ``export_peft``) takes one published
:class:`~melo_fast.routing.EditState`, never the open block; replacing publishes one new state under the
editor's lock, as a commit does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from melo_fast.config import MeloConfig
from melo_fast.editing.restore import check_model as check_model_of
from melo_fast.editing.restore import restored_state
from melo_fast.io import checkpoint, export
from melo_fast.io.fingerprint import Fingerprint
from melo_fast.routing import BlockLoRAHook, EditState, RouterHook, Routing
from melo_fast.routing.key_projection import KeyProjection
from melo_fast.targets import ModelKind
from melo_fast.vecdb import VectorDatabase


class EditStateIO:
    """MeloEditor's save/reload/export methods: the committed edit state read, written and replaced.

    The contract with the class that mixes it in (MeloEditor) is the attributes annotated here, plus:

    - ``state`` / ``db``: the published :class:`~melo_fast.routing.EditState` and its database;
      ``block_is_open``: whether a block is open (in any thread);
    - ``route(inputs)``: the block each row of ``inputs`` uses (``-1``: none);
    - ``_lock``: the re-entrant lock that serializes edits, commits and state replacements of the model;
    - ``_check_attached()``: raises the RuntimeError of an editor that ``close()`` detached from its model.
    """

    model: nn.Module
    config: MeloConfig
    kind: ModelKind
    routing: Routing
    router: RouterHook
    lora_layers: dict[str, BlockLoRAHook]

    # --- the committed state, on disk ---------------------------------------------------------
    def blocks(self, device: torch.device | str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every target's committed blocks: name → ``(A [n, k, d_in], B [n, k, d_out])`` in the model's dtype.

        Block ``b`` of a target adds ``scale * (x @ A[b].T) @ B[b]`` to its output. Views of the
        bank when it is one buffer on ``device`` (do not modify them), fresh tensors otherwise.

        Args:
            device: where to gather them; None: the bank's device. ``"cpu"`` gathers a bank held
                in several buffers on the host, without a second copy of it on the GPU.
        """
        return self._blocks_of(self.routing.published, device)

    def _blocks_of(self, state: EditState, device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: self.lora_layers[name].blocks_of(chunks, device) for name, chunks in state.blocks.items()}

    def save(self, path) -> None:
        """Write the whole edit state (config, blocks, database) to folder ``path``.

        Never destroys data: refuses a file or a non-empty folder that is not a melo_fast save, and
        replaces an earlier save atomically (see ``melo_fast.io.checkpoint``). Other threads may keep
        serving, and one may be editing, meanwhile: the save holds the committed edits only (a block
        still open is not in it).

        Raises:
            FileExistsError: ``path`` is a file, or a folder holding data that is not a melo_fast save
                (nothing is written).
            ValueError: ``path`` is an earlier save whose config names a weights file melo_fast does
                not write (``../x``, an absolute path): it is neither read nor deleted.
        """
        state = self.routing.published  # one snapshot: database, projection and blocks belong together
        checkpoint.write(
            path, self.config, state.database, self._blocks_of(state, "cpu"), self._fingerprint(), state.projection
        )

    def _fingerprint(self) -> Fingerprint:
        """The model's fingerprint, recorded in saves so that they load only onto this model's weights."""
        return Fingerprint.of(self.model, [self.config.router, *self.config.targets])

    def reload(self, path, check_model: bool = True) -> None:
        """Replace this editor's edit state (blocks and database) with the one saved in ``path``.

        Atomic while other threads run inference: one publish, as a commit. The save must come from
        a model patched the same way (router, targets, rank, key position, scale, shapes) and, unless
        ``check_model=False``, from a model with these weights (its fingerprint,
        ``melo_fast.io.fingerprint``: a copy in another dtype or on another device passes); otherwise
        a clear error and the state is unchanged. This is how edits trained in one process reach the
        processes that serve.

        Raises:
            FileNotFoundError: no melo_fast save at ``path``.
            ValueError: the save is corrupt (a checksum differs), was made with another patch or on another
                model (the message names what differs).
            RuntimeError: a block is open (commit or abort it first).
        """
        self._check_attached()
        saved = checkpoint.read(path)
        different = self.config.patch_spec.differences(saved.config.patch_spec)
        if different:
            details = ", ".join(different)
            raise ValueError(f"melo_fast: cannot reload {path}: it was made with another patch ({details})")
        self.restore(saved, path, check_model)

    def restore(self, saved: checkpoint.SavedEdits, path, check_model: bool = True) -> None:
        """Publish the edit state of a save read from ``path`` (:meth:`reload`, :func:`melo_fast.load`).

        Raises:
            ValueError: ``check_model`` and the save was made on another model, or the state does not fit
                (:meth:`replace_state`); nothing changes.
        """
        if check_model:
            check_model_of(saved.fingerprint, self._fingerprint(), path)
        self.replace_state(saved.database, saved.blocks, saved.projection)

    def replace_state(
        self,
        database: VectorDatabase,
        blocks: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        projection: KeyProjection | None = None,
    ) -> None:
        """Publish an edit state built elsewhere (what :meth:`reload` does once it has read a save).

        Args:
            database: a vector database with this router's key width, or ``projection``'s output width
                (copied to the model's device).
            blocks: every target name → ``(A [n, k, d_in], B [n, k, d_out])``, the same ``n`` for all
                targets, and every block id of ``database`` below ``n``.
            projection: the key projection ``database``'s keys went through (it is published with them),
                or None: raw router keys.

        Raises ValueError (state unchanged) when anything does not fit this model.
        """
        with self._lock:
            self._check_attached()
            if self.block_is_open:
                raise RuntimeError("melo_fast: commit() or abort() the open block before replacing the edit state")
            state, banks = restored_state(database, blocks, projection, self.lora_layers, self.db, self.router)
            for name, bank in banks.items():
                self.lora_layers[name].bank = bank
            self.routing.published = state

    def use_key_projection(self, projection: KeyProjection | None) -> None:
        """Route through ``projection`` from now on (None: raw router keys again, MELO's keys).

        Only before the first edit: the database holds keys of one key function, and a router's raw keys
        are not kept to re-project. The next edit uses ``projection.radius`` when ``init_radius="auto"``, and the
        database the projection's conflict rule when ``conflict_rule="auto"`` (``RadiusPolicy.conflict_rule_for``).
        (:func:`melo_fast.patch` takes ``key_projection=`` and calls this; a save holds the projection.)

        Raises:
            TypeError: ``projection`` is not a :class:`~melo_fast.KeyProjection` or None.
            ValueError: edits were made already, or the projection was trained on another router, key
                position or key width (the message names both).
            RuntimeError: a block is open.
        """
        if projection is not None and not isinstance(projection, KeyProjection):
            raise TypeError(
                f"melo_fast: use_key_projection takes a KeyProjection (KeyProjection.load(path), or what "
                f"train_key_projection returns) or None, got {type(projection).__name__}"
            )
        with self._lock:
            self._check_attached()
            if self.block_is_open:
                raise RuntimeError("melo_fast: commit() or abort() the open block before changing the key projection")
            state = self.routing.published
            if state.num_blocks or len(state.database):
                raise ValueError(
                    f"melo_fast: this editor holds {state.num_blocks} edit block(s) keyed by its current key function; "
                    "a key projection is chosen before the first edit. Patch a fresh copy of the model "
                    "(melo_fast.patch(model, config, key_projection=...)) and edit again"
                )
            if projection is not None:
                projection.check_fits(self.router.name, self.router.key_position, self.router.key_width)
                projection = projection.copy_to(state.database.device)  # the published state owns its copy
            width = self.router.key_width if projection is None else projection.out_dim
            # "auto" radius: None until the next edit takes the projection's radius (or measures one).
            policy = self.config.radius_policy
            database = VectorDatabase(width, policy.absolute, device=state.database.device,
                                      conflict_rule=policy.conflict_rule_for(projection))
            self.routing.published = dataclasses.replace(state, database=database, projection=projection)

    # --- serving with other engines (melo_fast.io.export) ------------------------------------------
    def export_peft(self, path, blocks=None) -> dict[int, str]:
        """Write the committed blocks (or ``blocks``) as PEFT LoRA adapters plus the routing to folder ``path``.

        Atomic and never destructive, like :meth:`save`; see ``melo_fast.io.export``. Returns
        ``{block_id: adapter_name}``.

        Raises:
            ValueError: a block id out of range or given twice, a patched PEFT model, or targets PEFT
                cannot name alone.
            FileExistsError: ``path`` holds data that is not a melo_fast export (nothing is written).
        """
        return export.export_peft(self._snapshot(), path, blocks)

    def _snapshot(self) -> export.Snapshot:
        """The committed edits, one published state and its blocks on the host, read without a commit in between."""
        while True:
            state = self.state
            blocks = self.blocks(device="cpu")  # gathered on the host: no second copy of the bank on a GPU
            if self.state is state:  # states are replaced, never modified: same object, same blocks
                return export.Snapshot(self.model, self.config, self.kind, state, blocks, self._fingerprint())

    def adapter_names(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        """One exported adapter name per row of ``inputs`` (``"__base__"``: no edit applies), for PEFT's
        ``model(**inputs, adapter_names=...)`` or an engine's per-request adapter."""
        return export.adapter_names(self.route(inputs).tolist())
