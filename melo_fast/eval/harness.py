"""The sequential editing protocol (GRACE/MELO): :class:`SequentialEval`.

Protocol, for every method on the same data and the same batches:

- records are split into *edited* records and *held-out* records (never edited; locality probes);
- edited records are edited in sequential batches of ``batch_size``;
- **ES**: the edited questions of a batch, right after that batch's edit (mean over all edits);
- **ERR**: all edited questions after the last batch (did old edits survive?);
- **generality**: ``rephrase_prompt`` and, separately, every ``generate_prompt`` of the edited
  records, after the last batch, must give ``target_new``;
- **locality**: Relation_Specificity questions of every record and the held-out records' questions
  (prompt and rephrase) must keep the unedited model's answers (``locality`` is the mean over both
  sets; each set is also reported);
- the score of one answer is accuracy for classifiers and token-F1 (also exact match) of the greedy
  generation for seq2seq/causal LMs, as MELO reports for zsRE; generative tasks also report the
  teacher-forced perplexity of ``target_new`` before and after editing;
- a curve of ES/ERR/generality/locality against the number of edits so far (on fixed samples of
  ``curve_sample`` questions per set, so that the baseline's curve stays affordable).

Methods: the unedited model, MELO (melo_fast), and sequential plain LoRA with MELO's rank budget
(:mod:`melo_fast.eval.baselines`).

This module is the protocol only: printing, JSON and plots are in :mod:`melo_fast.eval.report`,
the command lines in :mod:`melo_fast.eval.demo` and :mod:`melo_fast.eval.evaluate`.
"""

from __future__ import annotations

import math
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

METHODS = ("unedited", "melo", "lora")
LOCALITY_SETS = ("locality_relation", "locality_unedited")


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
    """

    batch_size: int = 10
    holdout: float = 0.2
    eval_batch_size: int = 64
    curve_points: int = 8
    curve_sample: int = 200
    progress: bool = True

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


class SequentialEval:
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
        self.sets = self._probe_sets()
        self.answerer = Answerer(task, list(self.sets.values()), self.settings.eval_batch_size)
        self.editor = None  # the MELO editor of the last run_melo(keep=True)
        self._curve_batches = set(_evenly(len(self.batches), self.settings.curve_points + 1))

    # --- probe sets ---------------------------------------------------------------------------
    def _probe_sets(self) -> dict[str, ProbeSet]:
        lengths = self.task.token_lengths

        def make(name, texts, references, owners, expected):
            max_tokens = lengths(expected) if expected is not None else None
            return ProbeSet(name, texts, references, owners, max_tokens)

        edited = self.edited
        targets = [r.target_new for r in edited]
        gen_owner = [i for i, r in enumerate(edited) for _ in r.generate_prompts]
        relation = [(r, p) for r in edited + self.held for p in r.locality]
        held_texts = [r.prompt for r in self.held] + [r.rephrase_prompt for r in self.held]
        held_expected = [r.ground_truth[0] for r in self.held] * 2
        sets = [
            make("edit", [r.prompt for r in edited], [[t] for t in targets], list(range(len(edited))), targets),
            make("rephrase", [r.rephrase_prompt for r in edited], [[t] for t in targets], list(range(len(edited))),
                 targets),
            make("generate", [g for r in edited for g in r.generate_prompts], [[targets[i]] for i in gen_owner],
                 gen_owner, [targets[i] for i in gen_owner]),
            make("locality_relation", [p.prompt for _, p in relation], None, [-1] * len(relation),
                 [p.ground_truth[0] for _, p in relation]),
            make("locality_unedited", held_texts, None, [-1] * len(held_texts), held_expected),
        ]
        return {s.name: s for s in sets}

    # --- scoring ------------------------------------------------------------------------------
    def _score(self, name: str, answers: Sequence[str], indices: Sequence[int]) -> dict[str, float]:
        """Mean score of ``answers`` of set ``name`` (questions ``indices``)."""
        probe_set = self.sets[name]
        totals: dict[str, list[float]] = {}
        for i, answer in zip(indices, answers, strict=True):
            references = probe_set.references[i] if probe_set.references is not None else [
                self.answerer.unedited[name][i]
            ]
            for key, value in self.task.score(answer, references).items():
                totals.setdefault(key, []).append(value)
        if not totals:  # an empty set: every score is NaN
            return {key: float("nan") for key in self.task.score("", [""])}
        return {key: metrics.mean(values) for key, values in totals.items()}

    def _put(self, out: dict, metric: str, scores: dict[str, float]) -> None:
        for key, value in scores.items():
            out[metric if key == self.task.primary else f"{metric}_{key}"] = value

    def final_metrics(self, answer, es_scores: dict[str, float]) -> dict[str, float]:
        """Every end-of-run metric of a model, from its answers now.

        Args:
            answer: ``answer(set_name, indices) -> list[str]``, the model's answers to those questions
                of a probe set (``self.sets``); any editing method can be scored this way.
            es_scores: the ES scores measured batch by batch (primary score and the others).

        Returns:
            ``es``, ``err``, ``generality_rephrase``, ``generality_generate`` (a mean over every
            generate prompt, not per record), ``locality_relation``, ``locality_unedited`` and
            ``locality`` (the mean over the questions of both locality sets), each also as
            ``<metric>_<score>`` for the task's secondary scores.
        """
        out: dict[str, float] = {}
        self._put(out, "es", es_scores)
        for metric, name in (("err", "edit"), ("generality_rephrase", "rephrase"),
                             ("generality_generate", "generate")):
            indices = range(len(self.sets[name]))
            self._put(out, metric, self._score(name, answer(name, indices), indices))
        weighted: dict[str, list[tuple[float, int]]] = {}
        for name in LOCALITY_SETS:
            indices = range(len(self.sets[name]))
            scores = self._score(name, answer(name, indices), indices)
            self._put(out, name, scores)
            for key, value in scores.items():
                if not math.isnan(value):
                    weighted.setdefault(key, []).append((value, len(indices)))
        overall = {key: sum(v * n for v, n in pairs) / sum(n for _, n in pairs) for key, pairs in weighted.items()}
        self._put(out, "locality", overall)
        return out

    def _curve_point(self, answer, edits_so_far: int, es_values: list[float]) -> dict:
        sample = self.settings.curve_sample
        point = {"edits": edits_so_far, "es": metrics.mean(es_values)}
        for metric, name in (("err", "edit"), ("generality_rephrase", "rephrase")):
            indices = _evenly(edits_so_far, sample)
            point[metric] = self._score(name, answer(name, indices), indices)[self.task.primary]
        scores, count = 0.0, 0
        for name in LOCALITY_SETS:
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
    def run_unedited(self) -> MethodResult:
        """The unedited model's answers to every probe set (also the locality reference)."""
        start = time.perf_counter()
        if not self.answerer.unedited:
            self.answerer.compute_unedited()

        def answer(name, indices):
            return [self.answerer.unedited[name][i] for i in indices]

        es = self._score("edit", answer("edit", range(len(self.edited))), range(len(self.edited)))
        result = MethodResult("unedited", self.final_metrics(answer, es))
        result.eval_seconds = time.perf_counter() - start
        if self.task.kind != "classifier":
            ppl = self.task.perplexity(self.edited)
            result.extra["perplexity_target_new"] = metrics.mean(ppl)
        return result

    def run_melo(self, config: MeloConfig, keep: bool = False) -> MethodResult:
        """Edit with MELO batch after batch. ``keep``: leave the model patched (``self.editor``)."""
        if not self.answerer.unedited:
            self.run_unedited()
        start_all = time.perf_counter()
        editor = melo_fast.patch(self.task.model, config, tokenizer=self.task.tokenizer)
        result = MethodResult("melo")
        es_values: list[float] = []
        es_totals: dict[str, list[float]] = {}
        edit_results = []

        def answer(name, indices):
            return self.answerer.routed(name, editor, indices)

        try:
            bar = self._progress("MELO edits")
            for b in bar:
                batch = self.task.edit_batch(self.batches[b])
                edit_results.append(editor.edit(batch))
                result.edit_seconds += edit_results[-1].seconds
                indices = self._batch_indices(b)
                scores = self._score("edit", answer("edit", indices), indices)
                for key, value in scores.items():
                    es_totals.setdefault(key, []).extend([value] * len(indices))
                es_values.extend([scores[self.task.primary]] * len(indices))
                bar.set_postfix(ES=f"{metrics.mean(es_values):.3f}", clusters=editor.db.num_clusters)
                if b in self._curve_batches:
                    result.curve.append(self._curve_point(answer, indices[-1] + 1, es_values))
            es = {key: metrics.mean(values) for key, values in es_totals.items()}
            result.metrics = self.final_metrics(answer, es)
            result.db = editor.db.stats()
            result.db["blocks"] = editor.num_blocks
            result.extra["config"] = editor.config.to_dict()
            # With init_radius="auto" the radius is measured at the first edit: record what was used.
            result.extra["init_radius"] = editor.db.init_radius
            result.extra["key_scale"] = editor.db.key_scale
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
        from melo_fast.vecdb import VectorDatabase

        saved_db, saved_blocks, saved_position = editor.db, editor.blocks(), editor.router.key_position
        result = MethodResult("melo")
        es_totals: dict[str, list[float]] = {}
        try:
            editor.router.key_position = key_position
            db = VectorDatabase(saved_db.dim, init_radius, device=saved_db.device)
            for b in range(len(self.batches)):
                batch = self.task.edit_batch(self.batches[b])
                db.insert(editor.keys(batch), editor.edit_batch(batch).targets, b)
                editor.replace_state(db, saved_blocks)
                indices = self._batch_indices(b)
                scores = self._score("edit", self.answerer.routed("edit", editor, indices), indices)
                for key, value in scores.items():
                    es_totals.setdefault(key, []).extend([value] * len(indices))
            es = {key: metrics.mean(values) for key, values in es_totals.items()}
            result.metrics = self.final_metrics(lambda n, i: self.answerer.routed(n, editor, i), es)
            result.db = db.stats()
            result.extra["config"] = {"key_position": key_position, "init_radius": init_radius}
        finally:
            editor.replace_state(saved_db, saved_blocks)
            editor.router.key_position = saved_position
        return result

    def key_scale(self, key_position=None) -> dict[str, float]:
        """Distances between keys, to choose ``init_radius`` for a router (needs a kept editor).

        Returns medians over edited records of: a question to its own rephrase
        (``question_to_rephrase``) and to the nearest other edited question
        (``question_to_nearest_question``), and of a locality question to the nearest edited
        question (``locality_to_nearest_question``).
        """
        editor = self.editor
        saved = editor.router.key_position
        try:
            if key_position is not None:
                editor.router.key_position = key_position
            questions = self.answerer.keys("edit", editor)
            rephrases = self.answerer.keys("rephrase", editor)
            between = torch.cdist(questions, questions)
            between.fill_diagonal_(float("inf"))
            locality = torch.cat([self.answerer.keys(name, editor) for name in LOCALITY_SETS])
            return {
                "question_to_rephrase": (questions - rephrases).norm(dim=1).median().item(),
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
        es_values: list[float] = []
        es_totals: dict[str, list[float]] = {}
        losses = []

        def answer(name, indices):
            return self.answerer.full(name, indices)

        try:
            bar = self._progress("LoRA baseline")
            for b in bar:
                batch = self.task.edit_batch(self.batches[b])
                start = time.perf_counter()
                losses.append(lora.edit(batch))
                result.edit_seconds += time.perf_counter() - start
                indices = self._batch_indices(b)
                scores = self._score("edit", answer("edit", indices), indices)
                for key, value in scores.items():
                    es_totals.setdefault(key, []).extend([value] * len(indices))
                es_values.extend([scores[self.task.primary]] * len(indices))
                bar.set_postfix(ES=f"{metrics.mean(es_values):.3f}")
                if b in self._curve_batches:
                    result.curve.append(self._curve_point(answer, indices[-1] + 1, es_values))
            es = {key: metrics.mean(values) for key, values in es_totals.items()}
            result.metrics = self.final_metrics(answer, es)
            if self.task.kind != "classifier":
                result.extra["perplexity_target_new"] = metrics.mean(self.task.perplexity(self.edited))
        finally:
            lora.remove()
        result.eval_seconds = time.perf_counter() - start_all - result.edit_seconds
        result.extra.update(rank=rank, targets=lora.target_names,
                            diverged_batches=sum(not math.isfinite(x) for x in losses))
        return result

    def run(self, config: MeloConfig, methods: Sequence[str] = METHODS) -> dict[str, MethodResult]:
        """Every method of ``methods`` in order; MELO's model is unpatched afterwards."""
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
        results = {"unedited": self.run_unedited()}
        if "melo" in methods:
            results["melo"] = self.run_melo(config)
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
