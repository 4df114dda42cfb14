"""The metrics of the sequential editing protocol, from a model's answers to the probe sets.

:class:`Scoring` is a mixin of :class:`~melo_fast.eval.harness.SequentialEval`: it turns answers
(greedy generations or class labels) and teacher-forced readings into ES, ERR, generality, locality,
portability, target repetition and the teacher-forced accuracies (the metrics are defined in the
:mod:`~melo_fast.eval.harness` docstring; the per-answer scores in :mod:`~melo_fast.eval.metrics` and the
task's ``score``). Which questions are asked when (batches, curve samples) stays in the harness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from melo_fast.eval import metrics
from melo_fast.eval.data import EditRecord
from melo_fast.eval.probes import Answerer, ProbeSet


def forced_name(set_name: str) -> str:
    """The teacher-forced metric of a set: ``rewrite_acc`` (edit), ``rephrase_acc``, ``locality_acc_<set>``,
    ``portability_acc_<kind>``."""
    if set_name in ("edit", "rephrase"):
        return {"edit": "rewrite_acc", "rephrase": "rephrase_acc"}[set_name]
    group, _, rest = set_name.partition("_")
    return f"{group}_acc_{rest}"


class Scoring:
    """SequentialEval's scoring: :meth:`final_metrics` and the scores it is built from.

    The contract with the class that mixes it in (SequentialEval) is the attributes annotated here:
    ``task`` (its ``score(answer, references)`` and ``primary`` score), the probe ``sets`` by name, the
    ``answerer`` and ``forcer`` (None without teacher forcing) holding the unedited model's answers and
    readings (the locality references), the ``edited`` records, and the names of the locality,
    portability and teacher-forced sets. The harness itself calls ``_score`` (mean scores of some
    answers of a set), ``_put`` (scores into a metrics dict under a metric's names) and ``_score_forced``
    (mean teacher-forced accuracy of some readings of a set).
    """

    task: object
    sets: dict[str, ProbeSet]
    answerer: Answerer
    forcer: Answerer | None
    edited: list[EditRecord]
    locality_sets: list[str]
    portability_sets: list[str]
    forced_sets: list[str]

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

    def _score_forced(self, name: str, readings: Sequence, indices: Sequence[int]) -> float:
        """Mean teacher-forced accuracy of ``readings`` (``(argmax tokens, answer tokens)`` per question)
        of set ``name``: against the answer's tokens, or for a locality set against the unedited
        model's argmax tokens."""
        unedited = self.forcer.unedited.get(name) if name in self.locality_sets else None
        return metrics.mean([
            metrics.token_accuracy(predicted, unedited[i][0] if unedited is not None else reference)
            for i, (predicted, reference) in zip(indices, readings, strict=True)
        ])

    def repetition(self, continuations: Sequence[str]) -> float:
        """Share of edited prompts whose continuation names its ``target_new`` more than once."""
        return metrics.mean([float(metrics.mentions(text, record.target_new) > 1)
                             for text, record in zip(continuations, self.edited, strict=True)])

    def final_metrics(self, answer, es_scores: dict[str, float], forced=None,
                      forced_at_edit: float | None = None) -> dict[str, float]:
        """Every end-of-run metric of a model, from its answers now.

        Args:
            answer: ``answer(set_name, indices) -> list[str]``, the model's answers to those questions
                of a probe set (``self.sets``); any editing method can be scored this way.
            es_scores: the ES scores measured batch by batch (primary score and the others).
            forced: ``forced(set_name, indices)``, the model's teacher-forced readings of those questions
                (generative tasks; None: no teacher-forced metrics).
            forced_at_edit: ``rewrite_acc_at_edit``, measured batch by batch.

        Returns:
            ``es``, ``err``, ``generality_rephrase``, ``generality_generate`` (a mean over every
            generate prompt, not per record), one entry per locality set (``locality_relation``,
            ``locality_<kind>``, ``locality_unedited``) and ``locality`` (the mean over the questions of
            all of them), one per portability set and ``portability`` (likewise), each also as
            ``<metric>_<score>`` for the task's secondary scores; for generative tasks
            ``target_repetition``; with ``forced`` the teacher-forced accuracies (:mod:`~melo_fast.eval.harness`
            docstring).
        """
        out: dict[str, float] = {}
        self._put(out, "es", es_scores)
        for metric, name in (("err", "edit"), ("generality_rephrase", "rephrase"),
                             ("generality_generate", "generate")):
            indices = range(len(self.sets[name]))
            self._put(out, metric, self._score(name, answer(name, indices), indices))
        for overall, names in (("locality", self.locality_sets), ("portability", self.portability_sets)):
            weighted: dict[str, list[tuple[float, int]]] = {}
            for name in names:
                indices = range(len(self.sets[name]))
                scores = self._score(name, answer(name, indices), indices)
                self._put(out, name, scores)
                for key, value in scores.items():
                    if not math.isnan(value):
                        weighted.setdefault(key, []).append((value, len(indices)))
            if names:
                self._put(out, overall, {key: sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
                                         for key, pairs in weighted.items()})
        if "continuation" in self.sets:
            out["target_repetition"] = self.repetition(answer("continuation", range(len(self.edited))))
        if forced is not None:
            out["rewrite_acc_at_edit"] = forced_at_edit
            totals: dict[str, list[float]] = {}
            for name in self.forced_sets:
                indices = range(len(self.sets[name]))
                value = self._score_forced(name, forced(name, indices), indices)
                out[forced_name(name)] = value
                group = name.partition("_")[0]
                if group in ("locality", "portability") and not math.isnan(value):
                    totals.setdefault(f"{group}_acc", []).extend([value] * len(indices))
            out.update({key: metrics.mean(values) for key, values in totals.items()})
        return out
