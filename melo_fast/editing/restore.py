"""An edit state built elsewhere (a save, an evaluation's replay), checked against a patched model
before ``MeloEditor.replace_state`` publishes it; and a save's model fingerprint against the model's."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from melo_fast.bank import BlockBank
from melo_fast.io.fingerprint import Fingerprint
from melo_fast.routing import BlockLoRAHook, EditState, RouterHook
from melo_fast.routing.key_projection import KeyProjection
from melo_fast.vecdb import VectorDatabase


def check_model(saved: Fingerprint | None, here: Fingerprint, path) -> None:
    """Refuse the save at ``path`` if it was made on another model than ``here`` (a save without a
    fingerprint passes: it predates them).

    Raises:
        ValueError: the fingerprints differ; the message names each module that differs and the override.
    """
    differences = [] if saved is None else saved.differences(here)
    if differences:
        raise ValueError(
            f"melo_fast: {path} was made on another model ({'; '.join(differences)}). Its keys are that model's "
            "router outputs, so its edits would not route here. Load it onto the model it was saved from; if this "
            "is that model and its weights changed on purpose, pass check_model=False (melo_fast.load(model, path, "
            "check_model=False) or editor.reload(path, check_model=False))"
        )


def restored_state(
    database: VectorDatabase,
    blocks: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    projection: KeyProjection | None,
    lora_layers: Mapping[str, BlockLoRAHook],
    published: VectorDatabase,
    router: RouterHook,
) -> tuple[EditState, dict[str, BlockBank]]:
    """The edit state of ``database`` and ``blocks`` for this model, and the banks that hold its blocks.

    Args:
        database: a vector database with the router's key width, or ``projection``'s output width (copied
            to ``published``'s device).
        blocks: every target name → ``(A [n, k, d_in], B [n, k, d_out])``, the same ``n`` for all
            targets, and every block id of ``database`` below ``n``.
        projection: the key projection ``database``'s keys went through, or None (raw router keys).
        lora_layers: the model's target hooks, by name.
        published: the model's current database (its device).
        router: the model's router hook (its name, key position and key width).

    Raises:
        ValueError: anything does not fit this model (the message says what); nothing was changed.
    """
    if projection is not None:
        projection.check_fits(router.name, router.key_position, router.key_width)
    width = router.key_width if projection is None else projection.out_dim
    if database.dim != width:
        source = f"this model's router {router.name!r}" if projection is None else "the key projection given with it"
        raise ValueError(
            f"melo_fast: the database has key width {database.dim}, but {source} gives {width}: it belongs to "
            "another model (or to keys projected by a KeyProjection that was not given with it)"
        )
    if set(blocks) != set(lora_layers):
        raise ValueError(f"melo_fast: blocks are given for {sorted(blocks)}, the targets are {sorted(lora_layers)}")
    counts = {A.shape[0] for A, _ in blocks.values()}
    if len(counts) != 1:
        raise ValueError(f"melo_fast: the targets have different block counts {sorted(counts)}")
    num_blocks = counts.pop()
    banks = {name: lora_layers[name].bank_of(A, B, num_blocks) for name, (A, B) in blocks.items()}
    highest = int(database.point_blocks.max()) if len(database) else -1
    if highest >= num_blocks:
        raise ValueError(f"melo_fast: the database routes to block {highest}; there are {num_blocks} blocks")
    database = database.copy()
    if database.device != published.device:
        database = VectorDatabase.from_state_dict(*database.state_dict(), device=published.device)
    if projection is not None:
        projection = projection.copy_to(published.device)  # the published state owns its copy
    state = EditState(database, {name: bank.chunks() for name, bank in banks.items()}, num_blocks, projection)
    return state, banks
