"""EditState: everything routing reads, published as one immutable object.

An edit state is the vector database (with the key projection its keys went through, if any) plus,
for every target, views of its trained blocks, plus the block count. Routing reads
``Routing.published`` once per forward call (at the router) and uses that one object for the whole
call, so a forward sees either all of the old edits or all of the new ones: never a database that
routes to a block its targets cannot read, nor keys projected for another database. The editor's commit and reload
build a new state and publish it with one attribute assignment; nothing in a published state is
ever modified (DESIGN §2.11).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from melo_fast.bank import BlockChunk
from melo_fast.routing.key_projection import KeyProjection
from melo_fast.vecdb import VectorDatabase


@dataclass(frozen=True)
class EditState:
    """One published edit state.

    Attributes:
        database: the vector database (never modified once published).
        blocks: target name → views of its blocks ``0 .. num_blocks - 1``, one per bank buffer.
        num_blocks: blocks trained so far; every block id in ``database`` is below it.
        projection: the key projection the database's keys went through, or None (raw router keys).
            Published with the database because it decides what the database's keys mean.
    """

    database: VectorDatabase
    blocks: Mapping[str, tuple[BlockChunk, ...]]
    num_blocks: int
    projection: KeyProjection | None = None
