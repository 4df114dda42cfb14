"""KnowEdit records as :class:`~melo_fast.Fact` s: the training data of a key projection.

A fact is one question of one subject in every wording a record gives (``prompt``, ``rephrase_prompt``,
``generate_prompt``); records of the same subject with a shared original answer ask the same fact and
are merged (zsRE repeats questions with other edit targets). Its hard negatives are its records'
locality questions that ask *another* fact of the subject ("Who founded X?" beside "Where is X based?").
A locality question that asks an edited fact in other words (:func:`same_fact`) is a paraphrase in
disguise: used as a negative it would teach the projection to push a real paraphrase away.
"""

from __future__ import annotations

import re

from melo_fast.editing.key_projection_training import Fact
from melo_fast.eval.data import EditRecord


def paraphrases(record: EditRecord) -> list[str]:
    """The record's ``generate_prompt`` paraphrases that are questions, in file order.

    Some zsRE records interleave punctuation-only entries (".", ")", "/"): not questions, and the same
    across records. A paraphrase needs two words of letters.
    """
    return [g for g in record.generate_prompts if len(re.findall(r"[A-Za-z]+", g)) >= 2]


def answers(values) -> set[str]:
    """Answers compared case- and space-insensitively."""
    return {v.strip().lower() for v in values}


def same_fact(subject: str, ground_truth: list[str], edited: list[EditRecord]) -> bool:
    """Whether a question about ``subject`` with answer ``ground_truth`` asks the fact of one of ``edited``.

    A proxy, since zsRE records carry no relation id: the same subject and a shared original answer.
    Many zsRE locality questions ask their own record's fact in another wording ("The constellation of
    Butterfly Cluster is" beside "What constellation is home to Butterfly Cluster?").
    """
    wanted = answers(ground_truth)
    return any(e.subject == subject and wanted & answers(e.ground_truth) for e in edited)


def facts_from_records(records: list[EditRecord]) -> list[Fact]:
    """One :class:`~melo_fast.Fact` per distinct (subject, original answer) of ``records``, in file order.

    Phrasings: every record's prompt, rephrase and question-like generate prompts (each once). Negatives:
    its records' locality questions that do not ask a fact of ``records`` about the same subject. Topic:
    the subject (the prompt for records without one).
    """
    by_subject: dict[str, list[EditRecord]] = {}
    for record in records:
        by_subject.setdefault(record.subject or record.prompt, []).append(record)
    phrasings: dict[tuple, dict[str, None]] = {}  # ordered sets
    negatives: dict[tuple, dict[str, None]] = {}
    for record in records:
        topic = record.subject or record.prompt
        fact = next(
            (f for f in phrasings if f[0] == topic and answers(record.ground_truth) & set(f[1])),
            (topic, tuple(sorted(answers(record.ground_truth)))),
        )
        phrasings.setdefault(fact, {})
        negatives.setdefault(fact, {})
        for text in [record.prompt, record.rephrase_prompt, *paraphrases(record)]:
            if text:
                phrasings[fact][text] = None
        for probes in record.locality.values():
            for probe in probes:
                if not same_fact(record.subject, probe.ground_truth, by_subject[topic]):
                    negatives[fact][probe.prompt] = None
    return [
        Fact(tuple(phrasings[f]), tuple(n for n in negatives[f] if n not in phrasings[f]), f[0]) for f in phrasings
    ]
