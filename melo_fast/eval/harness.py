"""The sequential editing protocol (GRACE/MELO): :class:`SequentialEval`.

Protocol, for every method on the same data and the same batches:

- records are split into *edited* records and *held-out* records (never edited; locality probes);
- edited records are edited in sequential batches of ``batch_size``;
- **ES**: the edited questions of a batch, right after that batch's edit (mean over all edits);
- **ERR**: all edited questions after the last batch (did old edits survive?);
- **generality**: ``rephrase_prompt`` (records that have one) and, separately, every
  ``generate_prompt`` of the edited records, after the last batch, must give ``target_new``;
- **locality**: the questions of every ``locality`` kind of every record (``locality_relation`` for
  Relation_Specificity, ``locality_<kind>`` for the others) and the held-out records' questions
  (prompt and rephrase, ``locality_unedited``) must keep the unedited model's answers (``locality``
  is the mean over the questions of all these sets; each set is also reported);
- **portability** (generative tasks): the questions of every ``portability`` kind of the edited
  records, after the last batch, must give their own ground truth (``portability_<kind>``, and
  ``portability`` over all of them);
- the score of one answer is accuracy for classifiers and token-F1 (also exact match) of the greedy
  generation for seq2seq/causal LMs, as MELO reports for zsRE; generative tasks also report the
  teacher-forced perplexity of ``target_new`` before and after editing;
- **teacher-forced accuracies** (generative tasks; the measurement of EasyEdit-style tables such as
  WISE's, GRACE's and ELDER's): one forward pass over ``question + answer``, the argmax token at each
  answer position. ``rewrite_acc``: edited prompt + ``target_new``, fraction of target tokens
  predicted, mean over records, after the last batch (``rewrite_acc_at_edit``: right after each
  batch); ``rephrase_acc``: the same on the rephrase prompt; ``locality_acc`` (and per set
  ``locality_acc_<set>``): locality question + its ground truth, fraction of the answer positions
  whose argmax equals the unedited model's; ``portability_acc`` (and per kind): portability
  question + its first ground truth, fraction of its tokens predicted;
- **target repetition** (generative tasks): the share of edited prompts whose 20-token greedy
  continuation names ``target_new`` more than once (:func:`metrics.mentions`);
- a curve of ES/ERR/generality/locality against the number of edits so far (on fixed samples of
  ``curve_sample`` questions per set, so that the baseline's curve stays affordable).

Methods: the unedited model, MELO (melo_fast), and sequential plain LoRA with MELO's rank budget
(:mod:`melo_fast.eval.baselines`).

This module is the protocol only: the metrics computed from a model's answers are in
:mod:`melo_fast.eval.scoring` (a mixin of :class:`SequentialEval`), printing, JSON and plots in
:mod:`melo_fast.eval.report`, the command lines in :mod:`melo_fast.eval.demo` and :mod:`melo_fast.eval.evaluate`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

import melo_fast
from melo_fast.config import MeloConfig
from melo_fast.eval import metrics
from melo_fast.eval.baselines import SequentialLoRA
from melo_fast.eval.data import EditRecord, split_edits
from melo_fast.eval.probes import Answerer, ProbeSet
from melo_fast.eval.scoring import Scoring, forced_name  # noqa: F401 (forced_name: re-exported, it was defined here)

METHODS = ("unedited", "melo", "lora")
CONTINUATION_TOKENS = 20  # tokens generated per edited prompt for the target-repetition metric


@dataclass
class Settings:
    """How the sequential evaluation runs.

    Attributes:
        batch_size: edits per batch (one MELO block per batch).
        holdout: fraction of records never edited (locality probes); every round(1/holdout)-th.
        eval_batch_size: questions answered per forward pass.
        curve_points: number of points of the metrics-vs-edits curve (besides the end).
        curve_sample: questions per set on which curve points are measured.
        progress: show a tqdm progress bar.
        continuation_tokens: tokens of the greedy continuation of each edited prompt in which target
            repetition is counted (generative tasks).
    """

    batch_size: int = 10
    holdout: float = 0.2
    eval_batch_size: int = 64
    curve_points: int = 8
    curve_sample: int = 200
    progress: bool = True
    continuation_tokens: int = CONTINUATION_TOKENS

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")


@dataclass
class MethodResult:
    """Metrics of one method. ``metrics`` holds the primary score of each metric (accuracy or
    token-F1) and ``<metric>_<score>`` for the others (e.g. ``es_exact_match``)."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    edit_seconds: float = 0.0
    eval_seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)
    db: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "metrics": self.metrics,
            "edit_seconds": self.edit_seconds,
            "eval_seconds": self.eval_seconds,
            "curve": self.curve,
            "db": self.db,
            **self.extra,
        }


def _evenly(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)``."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def probe_set_name(group: str, kind: str) -> str:
    """The probe set (and metric) name of a locality or portability kind of a KnowEdit file:
    ``locality_relation`` for Relation_Specificity, else ``<group>_<kind in snake case>``."""
    if group == "locality" and kind == "Relation_Specificity":
        return "locality_relation"
    return f"{group}_" + re.sub(r"[^0-9a-z]+", "_", kind.lower()).strip("_")


class SequentialEval(Scoring):
    """Sequential editing of one task's model on KnowEdit records, for several methods.

    Args:
        task: a :mod:`melo_fast.eval.tasks` adapter (model + tokenizer).
        records: the records (``load_records``).
        settings: :class:`Settings`.
    """

    def __init__(self, task, records: Sequence[EditRecord], settings: Settings | None = None):
        self.task = task
        self.settings = settings or Settings()
        self.edited, self.held = split_edits(list(records), self.settings.holdout)
        if not self.edited:
            raise ValueError("no records to edit")
        size = self.settings.batch_size
        self.batches = [self.edited[i : i + size] for i in range(0, len(self.edited), size)]
        self.generative = hasattr(task, "forced_tokens")
        self.sets = self._probe_sets()
        self.locality_sets = [name for name in self.sets if name.startswith("locality_")]
        self.portability_sets = [name for name in self.sets if name.startswith("portability_")]
        self.answerer = Answerer(task, list(self.sets.values()), self.settings.eval_batch_size)
        # Teacher-forced readings (generative tasks): the sets EasyEdit-style tables score.
        self.forced_sets = ["edit", "rephrase", *self.locality_sets, *self.portability_sets] if self.generative else []
        self.forcer = Answerer(task, [self.sets[n] for n in self.forced_sets], self.settings.eval_batch_size,
                               forced=True) if self.generative else None
        self.editor = None  # the MELO editor of the last run_melo(keep=True)
        self._curve_batches = set(_evenly(len(self.batches), self.settings.curve_points + 1))

    # --- probe sets ---------------------------------------------------------------------------
    def _probe_sets(self) -> dict[str, ProbeSet]:
        """Every probe set of the records: ``edit``, ``rephrase``, ``generate``, a ``locality_*`` set per
        locality kind, ``locality_unedited``, and for generative tasks a ``portability_*`` set per
        portability kind and ``continuation``. The fixed sets exist even when empty (their metrics
        are then NaN), so that reports keep the same keys."""
        lengths = self.task.token_lengths

        def make(name, items, references):
            """``items``: ``(question, owner, expected answer)``; ``references``: accepted answers per
            question, or None (locality: the unedited model's answer is the reference)."""
            expected = [e for _, _, e in items]
            return ProbeSet(name, [q for q, _, _ in items], references, [o for _, o, _ in items],
                            lengths(expected), expected)

        edited = self.edited
        edits = [(r.prompt, i, r.target_new) for i, r in enumerate(edited)]
        rephrases = [(r.rephrase_prompt, i, r.target_new) for i, r in enumerate(edited) if r.rephrase_prompt]
        generate = [(g, i, r.target_new) for i, r in enumerate(edited) for g in r.generate_prompts]
        sets = [make("edit", edits, [[e] for _, _, e in edits]),
                make("rephrase", rephrases, [[e] for _, _, e in rephrases]),
                make("generate", generate, [[e] for _, _, e in generate])]
        locality: dict[str, list] = {"locality_relation": []}
        for r in edited + self.held:
            for kind, probes in r.locality.items():
                locality.setdefault(probe_set_name("locality", kind), []).extend(
                    (p.prompt, -1, p.ground_truth[0]) for p in probes)
        held = [(r.prompt, -1, r.original_answer) for r in self.held]
        held += [(r.rephrase_prompt, -1, r.original_answer) for r in self.held if r.rephrase_prompt]
        locality["locality_unedited"] = held
        sets += [make(name, items, None) for name, items in locality.items()]
        if self.generative:
            portability: dict[str, tuple[list, list]] = {}
            for i, r in enumerate(edited):
                for kind, probes in r.portability.items():
                    items, references = portability.setdefault(probe_set_name("portability", kind), ([], []))
                    items.extend((p.prompt, i, p.ground_truth[0]) for p in probes)
                    references.extend(p.ground_truth for p in probes)
            sets += [make(name, items, references) for name, (items, references) in portability.items()]
            n = self.settings.continuation_tokens
            sets.append(ProbeSet("continuation", [r.prompt for r in edited], [[r.target_new] for r in edited],
                                 list(range(len(edited))), [n] * len(edited)))
        return {s.name: s for s in sets}

    def owned_by(self, name: str, records: int) -> list[int]:
        """Indices of the questions of set ``name`` that belong to the first ``records`` edited records."""
        return [i for i, owner in enumerate(self.sets[name].owners) if 0 <= owner < records]

    # --- batches and curve points -------------------------------------------------------------
    def _curve_point(self, answer, edits_so_far: int, es_values: list[float]) -> dict:
        sample = self.settings.curve_sample
        point = {"edits": edits_so_far, "es": metrics.mean(es_values)}
        for metric, name in (("err", "edit"), ("generality_rephrase", "rephrase")):
            owned = self.owned_by(name, edits_so_far)
            indices = [owned[j] for j in _evenly(len(owned), sample)]
            point[metric] = self._score(name, answer(name, indices), indices)[self.task.primary]
        scores, count = 0.0, 0
        for name in self.locality_sets:
            indices = _evenly(len(self.sets[name]), sample // 2)
            if indices:
                scores += self._score(name, answer(name, indices), indices)[self.task.primary] * len(indices)
                count += len(indices)
        point["locality"] = scores / count if count else float("nan")
        return point

    def _batch_indices(self, b: int) -> list[int]:
        start = b * self.settings.batch_size
        return list(range(start, start + len(self.batches[b])))

    def _progress(self, description: str):
        from tqdm.auto import tqdm

        return tqdm(range(len(self.batches)), desc=description, unit="batch", disable=not self.settings.progress)

    # --- methods ------------------------------------------------------------------------------
    def _sequential(self, result: MethodResult, description: str, edit, answer, forced, postfix=dict):
        """Edit batch after batch; ES (and ``rewrite_acc_at_edit``) right after each batch; curve points.

        ``edit(batch) -> seconds`` edits one batch; ``answer``/``forced`` read the model now (see
        :meth:`final_metrics`); ``postfix()`` adds fields to the progress bar. Returns the ES scores
        and the mean ``rewrite_acc_at_edit`` (None without ``forced``).
        """
        es_values: list[float] = []
        es_totals: dict[str, list[float]] = {}
        forced_values: list[float] = []
        bar = self._progress(description)
        for b in bar:
            result.edit_seconds += edit(self.task.edit_batch(self.batches[b]))
            indices = self._batch_indices(b)
            scores = self._score("edit", answer("edit", indices), indices)
            for key, value in scores.items():
                es_totals.setdefault(key, []).extend([value] * len(indices))
            es_values.extend([scores[self.task.primary]] * len(indices))
            if forced is not None:
                forced_values.extend([self._score_forced("edit", forced("edit", indices), indices)] * len(indices))
            bar.set_postfix(ES=f"{metrics.mean(es_values):.3f}", **postfix())
            if b in self._curve_batches:
                result.curve.append(self._curve_point(answer, indices[-1] + 1, es_values))
        es = {key: metrics.mean(values) for key, values in es_totals.items()}
        return es, (metrics.mean(forced_values) if forced is not None else None)

    def _readers(self, full: bool, editor=None):
        """``(answer, forced)`` of the model now: every question through it (``full``), or MELO's routed
        fast path with ``editor``; ``forced`` is None for tasks without teacher forcing."""
        if full:
            return self.answerer.full, (self.forcer.full if self.forcer else None)

        def answer(name, indices):
            return self.answerer.routed(name, editor, indices)

        def forced(name, indices):
            return self.forcer.routed(name, editor, indices)

        return answer, (forced if self.forcer else None)

    def run_unedited(self) -> MethodResult:
        """The unedited model's answers to every probe set (also the locality reference)."""
        start = time.perf_counter()
        if not self.answerer.unedited:
            self.answerer.compute_unedited()
            if self.forcer:
                self.forcer.compute_unedited()

        def answer(name, indices):
            return [self.answerer.unedited[name][i] for i in indices]

        def forced(name, indices):
            return [self.forcer.unedited[name][i] for i in indices]

        everything = range(len(self.edited))
        es = self._score("edit", answer("edit", everything), everything)
        at_edit = self._score_forced("edit", forced("edit", everything), everything) if self.forcer else None
        result = MethodResult("unedited", self.final_metrics(answer, es, forced if self.forcer else None, at_edit))
        result.eval_seconds = time.perf_counter() - start
        if self.task.kind != "classifier":
            ppl = self.task.perplexity(self.edited)
            result.extra["perplexity_target_new"] = metrics.mean(ppl)
        return result

    def run_melo(self, config: MeloConfig, keep: bool = False, key_projection=None) -> MethodResult:
        """Edit with MELO batch after batch. ``keep``: leave the model patched (``self.editor``).
        ``key_projection``: route through this :class:`~melo_fast.KeyProjection` (``melo_fast.patch``'s)."""
        if not self.answerer.unedited:
            self.run_unedited()
        start_all = time.perf_counter()
        editor = melo_fast.patch(self.task.model, config, tokenizer=self.task.tokenizer, key_projection=key_projection)
        result = MethodResult("melo")
        answer, forced = self._readers(full=False, editor=editor)

        def edit(batch):
            return editor.edit(batch).seconds

        try:
            es, at_edit = self._sequential(result, "MELO edits", edit, answer, forced,
                                           postfix=lambda: {"clusters": editor.db.num_clusters})
            result.metrics = self.final_metrics(answer, es, forced, at_edit)
            result.db = editor.db.stats()
            result.db["blocks"] = editor.num_blocks
            result.extra["config"] = editor.config.to_dict()
            # With init_radius="auto" the radius is measured at the first edit: record what was used.
            result.extra["init_radius"] = editor.db.init_radius
            result.extra["key_scale"] = editor.db.key_scale
            if key_projection is not None:
                result.extra["key_projection"] = key_projection.meta()
            result.extra["routed_questions_forwarded"] = self.answerer.forwarded
            if self.task.kind != "classifier":
                result.extra["perplexity_target_new"] = metrics.mean(self.task.perplexity(self.edited))
        except BaseException:
            melo_fast.unpatch(self.task.model)
            raise
        result.eval_seconds = time.perf_counter() - start_all - result.edit_seconds
        if keep:
            self.editor = editor
        else:
            melo_fast.unpatch(self.task.model)
        return result

    def release(self) -> None:
        """Unpatch the model kept by ``run_melo(keep=True)``."""
        if self.editor is not None:
            melo_fast.unpatch(self.task.model)
            self.editor = None

    def replay(self, key_position, init_radius: float) -> MethodResult:
        """MELO's metrics for another key position / init_radius, reusing the trained blocks.

        Exact, not an approximation: a block is trained with every sample of its batch routed to
        it, so what a block learns does not depend on the database, the keys or the radius (only on
        the seed); only routing does. The database is rebuilt batch by batch from the same keys
        and labels (ES is measured after each insert, as in a real run); the model's own database
        and key position are restored afterwards. Requires ``run_melo(config, keep=True)``.
        """
        editor = self.editor
        if editor is None:
            raise RuntimeError("replay needs run_melo(config, keep=True) first")
        if editor.state.projection is not None:
            raise ValueError("replay rebuilds routing by raw router keys; the run used a key projection")
        from melo_fast.vecdb import VectorDatabase

        saved_db, saved_blocks, saved_position = editor.db, editor.blocks(), editor.router.key_position
        result = MethodResult("melo")
        answer, forced = self._readers(full=False, editor=editor)
        es_totals: dict[str, list[float]] = {}
        forced_values: list[float] = []
        try:
            editor.router.key_position = key_position
            db = VectorDatabase(saved_db.dim, init_radius, device=saved_db.device, conflict_rule=saved_db.conflict_rule)
            for b in range(len(self.batches)):
                batch = self.task.edit_batch(self.batches[b])
                db.insert(editor.keys(batch), editor.edit_batch(batch).targets, b)
                editor.replace_state(db, saved_blocks)
                indices = self._batch_indices(b)
                scores = self._score("edit", answer("edit", indices), indices)
                for key, value in scores.items():
                    es_totals.setdefault(key, []).extend([value] * len(indices))
                if forced is not None:
                    forced_values.extend([self._score_forced("edit", forced("edit", indices), indices)] * len(indices))
            es = {key: metrics.mean(values) for key, values in es_totals.items()}
            result.metrics = self.final_metrics(answer, es, forced,
                                                metrics.mean(forced_values) if forced is not None else None)
            result.db = db.stats()
            result.extra["config"] = {"key_position": key_position, "init_radius": init_radius}
        finally:
            editor.replace_state(saved_db, saved_blocks)
            editor.router.key_position = saved_position
        return result

    def key_scale(self, key_position=None) -> dict[str, float]:
        """Distances between keys, to choose ``init_radius`` for a router (needs a kept editor).

        Returns medians over edited records of: a question to its own rephrase
        (``question_to_rephrase``, over the records that have one; NaN if none does) and to the nearest
        other edited question (``question_to_nearest_question``), and of a locality question to the
        nearest edited question (``locality_to_nearest_question``).
        """
        editor = self.editor
        saved = editor.router.key_position
        try:
            if key_position is not None:
                editor.router.key_position = key_position
            questions = self.answerer.keys("edit", editor)
            owners = self.sets["rephrase"].owners
            rephrase = (questions[owners] - self.answerer.keys("rephrase", editor)).norm(dim=1) if owners else None
            between = torch.cdist(questions, questions)
            between.fill_diagonal_(float("inf"))
            locality = torch.cat([self.answerer.keys(name, editor) for name in self.locality_sets
                                  if len(self.sets[name])])
            return {
                "question_to_rephrase": rephrase.median().item() if rephrase is not None else float("nan"),
                "question_to_nearest_question": between.min(1).values.median().item(),
                "locality_to_nearest_question": torch.cdist(locality, questions).min(1).values.median().item(),
            }
        finally:
            editor.router.key_position = saved

    def run_lora(self, config: MeloConfig) -> MethodResult:
        """Sequential plain LoRA on MELO's targets, rank = rank_per_block × number of batches."""
        if not self.answerer.unedited:
            self.run_unedited()
        if self.editor is not None:
            raise RuntimeError("release() the kept MELO editor before running the LoRA baseline")
        targets = config.targets
        if targets is None:
            from melo_fast.patching import default_names

            targets = default_names(self.task.model)[1]
        rank = config.rank_per_block * len(self.batches)
        lora = SequentialLoRA(
            self.task.model, targets, rank, config.scale, config.edit_lr, config.num_iter,
            config.scheduler_step, config.scheduler_gamma, backend=config.backend,
        )
        start_all = time.perf_counter()
        result = MethodResult("lora")
        losses = []
        answer, forced = self._readers(full=True)

        def edit(batch):
            start = time.perf_counter()
            losses.append(lora.edit(batch))
            return time.perf_counter() - start

        try:
            es, at_edit = self._sequential(result, "LoRA baseline", edit, answer, forced)
            result.metrics = self.final_metrics(answer, es, forced, at_edit)
            if self.task.kind != "classifier":
                result.extra["perplexity_target_new"] = metrics.mean(self.task.perplexity(self.edited))
        finally:
            lora.remove()
        result.eval_seconds = time.perf_counter() - start_all - result.edit_seconds
        result.extra.update(rank=rank, targets=lora.target_names,
                            diverged_batches=sum(not math.isfinite(x) for x in losses))
        return result

    def run(self, config: MeloConfig, methods: Sequence[str] = METHODS, key_projection=None) -> dict[str, MethodResult]:
        """Every method of ``methods`` in order; MELO's model is unpatched afterwards (``key_projection``: MELO's,
        as :meth:`run_melo`)."""
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
        results = {"unedited": self.run_unedited()}
        if "melo" in methods:
            results["melo"] = self.run_melo(config, key_projection=key_projection)
        if "lora" in methods:
            results["lora"] = self.run_lora(config)
        return {name: results[name] for name in METHODS if name in results}

    def describe(self) -> dict:
        """The run's shape, and two facts of the edit set that bound what any method can score.

        ``targets_already_true``: edited records whose ``target_new`` is one of their ground truths
        (an unedited model that knows the facts scores them on ES/ERR). ``conflicting_prompts``:
        groups of edited records (record indices) that ask the same prompt with different targets;
        after all edits one answer per prompt can hold, so with accuracy ERR is at most
        ``err_ceiling`` (token-F1 may give partial credit to both).
        """
        by_prompt: dict[str, list[EditRecord]] = {}
        for record in self.edited:
            by_prompt.setdefault(record.prompt, []).append(record)
        conflicts = [[r.index for r in group] for group in by_prompt.values()
                     if len({r.target_new for r in group}) > 1]
        can_hold = sum(max(sum(r.target_new == t.target_new for r in group) for t in group)
                       for group in by_prompt.values())
        return {
            "records": len(self.edited) + len(self.held),
            "edited": len(self.edited),
            "held_out": len(self.held),
            "batch_size": self.settings.batch_size,
            "batches": len(self.batches),
            "probe_questions": {name: len(s) for name, s in self.sets.items()},
            "targets_already_true": sum(r.target_new in r.ground_truth for r in self.edited),
            "conflicting_prompts": conflicts,
            "err_ceiling": can_hold / len(self.edited),
        }
