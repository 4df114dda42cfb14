"""An edit state built elsewhere (a save, an evaluation's replay), checked against a patched model
before ``MeloEditor.replace_state`` publishes it; and a save's model fingerprint against the model's."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from melo_fast.bank import BlockBank
from melo_fast.io.fingerprint import Fingerprint
from melo_fast.routing import BlockLoRAHook, EditState
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
    lora_layers: Mapping[str, BlockLoRAHook],
    published: VectorDatabase,
    router: str,
) -> tuple[EditState, dict[str, BlockBank]]:
    """The edit state of ``database`` and ``blocks`` for this model, and the banks that hold its blocks.

    Args:
        database: a vector database with the router's key width (copied to ``published``'s device).
        blocks: every target name → ``(A [n, k, d_in], B [n, k, d_out])``, the same ``n`` for all
            targets, and every block id of ``database`` below ``n``.
        lora_layers: the model's target hooks, by name.
        published: the model's current database (its key width and device).
        router: the router's name, for the messages.

    Raises:
        ValueError: anything does not fit this model (the message says what); nothing was changed.
    """
    if database.dim != published.dim:
        raise ValueError(
            f"melo_fast: the database has key width {database.dim}, but this model's router "
            f"{router!r} gives {published.dim}: it belongs to another model"
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
    return EditState(database, {name: bank.chunks() for name, bank in banks.items()}, num_blocks), banks
