"""Negatives that name a neighbouring numbered entity: "HD 177809" beside a fact about "HD 177808".

Why: a number in a subject names a different entity when it changes (star catalogue entries, satellites
"USA-35" / "USA-64", "4 Sagittarii" / "43 Sagittarii", genes "ZIC2" / "ZIC3", "the 1998 / 2002 World Cup").
A pooled key of such a question differs from its neighbour's by one token in about fifteen, so a map trained
only on paraphrases and other questions about the same subject puts the two a paraphrase's distance apart,
and an edit of one reaches the other. Such pairs are rare among the facts a step draws, so training seldom
sees one. These negatives show it one for every numbered fact: each wording of the fact with a number of its
subject changed, a question the edit must stay out of.

Only numbers in the fact's ``topic`` (its subject) are changed, and only in wordings that name the topic as
written: a number elsewhere in a question ("born in 1990") may be part of the relation, not of the entity.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"\d+")


def neighbouring_numbers(number: str) -> tuple[str, str]:
    """Two other numbers beside ``number`` (a string of digits): its last digit moved on by one, and the number
    one digit shorter (one digit longer, the digit repeated, where it has only one).

    >>> neighbouring_numbers("177808"), neighbouring_numbers("4")
    (('177809', '17780'), ('5', '44'))
    """
    moved = number[:-1] + str((int(number[-1]) + 1) % 10)
    return moved, number[:-1] if len(number) > 1 else number * 2


def number_negatives(phrasings: tuple[str, ...], topic: str | None) -> list[tuple[str, str]]:
    """Wordings of a fact about another numbered entity, each with the subject it names.

    Args:
        phrasings: the fact's wordings.
        topic: its subject; None or a subject without digits gives none.

    Returns:
        ``(question, changed topic)`` pairs, one per wording that contains ``topic``: the wording with one number
        of the topic changed (:func:`neighbouring_numbers`), the numbers and both changes taken in turn, so
        that a fact's wordings cover several neighbours. No question equals one of ``phrasings``.
    """
    numbers = list(_NUMBER.finditer(topic or ""))
    if not numbers:
        return []
    out = []
    for i, text in enumerate(phrasings):
        if topic not in text:
            continue
        number = numbers[i % len(numbers)]
        other = neighbouring_numbers(number.group())[(i // len(numbers)) % 2]
        changed = topic[: number.start()] + other + topic[number.end() :]
        question = text.replace(topic, changed)
        if question not in phrasings:
            out.append((question, changed))
    return out
