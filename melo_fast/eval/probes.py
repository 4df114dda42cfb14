"""Probe sets (the questions metrics are computed on) and a model's answers to them.

Evaluating an edited model means answering thousands of questions after every few edits. Two facts
make most of that work unnecessary for MELO, without changing a single answer:

1. The router runs before every LoRA target, so a question's key never changes with edits: keys
   are computed once per key position and cached.
2. A question the database routes to "none" (block -1) gets exactly the unedited model's output,
   and a committed block never changes: so only routed questions are run through the model, and
   each (question, block) answer is computed once.

Questions are answered in fixed chunks (``batch_size`` consecutive questions of a set, padded
together), and a routed subset is run as rows sliced from its chunk's padded tensors, so every key
(even position -1, MELO's released choice and a pad token for short rows) is the same as in a full pass.
:meth:`Answerer.full` is the plain path (every question through the model); tests check that both
give the same answers.

An answer is a greedy generation, or with ``forced=True`` a teacher-forced reading: one forward pass
over ``question + expected answer`` giving the argmax token at each answer position (MELO keys such a
row at its last question token, so it routes as the question does in generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ProbeSet:
    """Questions of one kind (edit prompts, paraphrases, locality questions ...).

    Attributes:
        name: e.g. ``"edit"``, ``"rephrase"``, ``"generate"``, ``"locality_relation"``.
        texts: the questions.
        references: accepted answers per question (what an edit should produce); None for
            locality sets, whose reference is the unedited model's answer.
        owners: per question, the index of the edit record it belongs to (or -1).
        max_tokens: generation budget per question (generative tasks), else None.
        expected: per question, the answer teacher forcing feeds after it (``target_new``, a
            probe's first ground truth), or None for a set that is only generated.
    """

    name: str
    texts: list[str]
    references: list[list[str]] | None
    owners: list[int]
    max_tokens: list[int] | None = None
    expected: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


class Answerer:
    """Answers of one task's model to the probe sets, with MELO's routed fast path.

    Args:
        task: a :mod:`melo_fast.eval.tasks` adapter.
        probe_sets: the sets to answer (with ``forced``: each must have ``expected``).
        batch_size: questions per chunk.
        forced: teacher-forced readings (``task.forced_batch`` / ``task.forced_tokens``; an answer is
            ``(argmax tokens, expected answer tokens)``) instead of greedy generations (strings).
    """

    def __init__(self, task, probe_sets: Sequence[ProbeSet], batch_size: int = 64, forced: bool = False):
        if batch_size < 1:
            raise ValueError(f"eval batch size must be >= 1, got {batch_size}")
        if forced and any(s.expected is None for s in probe_sets):
            raise ValueError("teacher forcing needs an expected answer for every question of every set")
        self.task = task
        self.sets = {s.name: s for s in probe_sets}
        self.batch_size = batch_size
        self.forced = forced
        self._inputs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._keys: dict[tuple, torch.Tensor] = {}
        self._routed: dict[tuple[str, int, int], object] = {}
        self._editor = None
        self.unedited: dict[str, list] = {}
        self.forwarded = 0  # questions actually run through the model (for the report)

    # --- chunks -------------------------------------------------------------------------------
    def _chunk(self, name: str, c: int) -> dict[str, torch.Tensor]:
        key = (name, c)
        if key not in self._inputs:
            rows = slice(c * self.batch_size, (c + 1) * self.batch_size)
            probe_set = self.sets[name]
            if self.forced:
                self._inputs[key] = self.task.forced_batch(probe_set.texts[rows], probe_set.expected[rows])
            else:
                self._inputs[key] = self.task.encode(probe_set.texts[rows])
        return self._inputs[key]

    def _by_chunk(self, indices: Sequence[int]) -> dict[int, list[int]]:
        chunks: dict[int, list[int]] = {}
        for i in indices:
            chunks.setdefault(i // self.batch_size, []).append(i)
        return chunks

    def _run(self, name: str, c: int, rows: list[int]) -> list:
        """Answers of questions ``rows`` (set indices, all in chunk ``c``), sliced from the chunk."""
        inputs = self._chunk(name, c)
        local = torch.tensor([i - c * self.batch_size for i in rows])
        sliced = {k: v[local] for k, v in inputs.items()}
        self.forwarded += len(rows)
        if self.forced:
            return self.task.forced_tokens(sliced)
        probe_set = self.sets[name]
        budget = None if probe_set.max_tokens is None else [probe_set.max_tokens[i] for i in rows]
        return self.task.answer(sliced, budget)

    # --- answers ------------------------------------------------------------------------------
    def full(self, name: str, indices: Sequence[int] | None = None) -> list:
        """Answers of the model as it is now, every question run through it."""
        indices = range(len(self.sets[name])) if indices is None else indices
        answers = {}
        for c, rows in self._by_chunk(indices).items():
            answers.update(zip(rows, self._run(name, c, rows), strict=True))
        return [answers[i] for i in indices]

    def compute_unedited(self) -> None:
        """Answer every set with the model as it is now (call before any edit)."""
        for name in self.sets:
            self.unedited[name] = self.full(name)

    def routed(self, name: str, editor, indices: Sequence[int] | None = None) -> list:
        """Answers of the MELO-patched model: questions routed to "none" take the unedited answer.

        Requires :meth:`compute_unedited` first. Keys are cached per key position, answers per
        (question, block); both stay valid while blocks are only added (never retrained).
        """
        if name not in self.unedited:
            raise RuntimeError("Answerer.routed: call compute_unedited() before editing")
        indices = range(len(self.sets[name])) if indices is None else indices
        self._bind(editor)
        answers = {}
        for c, rows in self._by_chunk(indices).items():
            block_of = self._chunk_blocks(name, c, editor, rows)
            missing = [i for i in rows if block_of[i] >= 0 and (name, i, block_of[i]) not in self._routed]
            if missing:
                # The model routes these rows itself (same padded tensors → same keys → same blocks).
                for i, answer in zip(missing, self._run(name, c, missing), strict=True):
                    self._routed[(name, i, block_of[i])] = answer
            for i in rows:
                block = block_of[i]
                answers[i] = self.unedited[name][i] if block < 0 else self._routed[(name, i, block)]
        return [answers[i] for i in indices]

    def blocks(self, name: str, editor, indices: Sequence[int] | None = None) -> list[int]:
        """The block each question routes to now (-1: none), from the cached keys."""
        indices = range(len(self.sets[name])) if indices is None else indices
        self._bind(editor)
        out = {}
        for c, rows in self._by_chunk(indices).items():
            out.update(self._chunk_blocks(name, c, editor, rows))
        return [out[i] for i in indices]

    def keys(self, name: str, editor) -> torch.Tensor:
        """``[len(set), d]`` float32 keys of a whole set under the editor's router and key position."""
        self._bind(editor)
        n_chunks = -(-len(self.sets[name]) // self.batch_size)
        return torch.cat([self._chunk_keys(name, c, editor) for c in range(n_chunks)])

    def _chunk_keys(self, name: str, c: int, editor) -> torch.Tensor:
        key = (name, c, editor.config.router, editor.router.key_position)
        if key not in self._keys:
            inputs = self._chunk(name, c)
            key_inputs = getattr(self.task, "key_inputs", None)  # generative tasks: positions as in generate
            self._keys[key] = editor.keys(key_inputs(inputs) if key_inputs else inputs)
        return self._keys[key]

    def _chunk_blocks(self, name: str, c: int, editor, rows: list[int]) -> dict[int, int]:
        blocks = editor.db.search(self._chunk_keys(name, c, editor), backend=editor.config.backend).tolist()
        return {i: blocks[i - c * self.batch_size] for i in rows}

    def _bind(self, editor) -> None:
        """Cached (question, block) answers belong to one editor's blocks: a new editor starts afresh."""
        if self._editor is not editor:
            self._routed.clear()
            self._editor = editor
