"""Edit records in the KnowEdit format: load, validate (clear errors), split.

A KnowEdit file is one JSON list of records. What is read from a record:

- ``prompt`` (required): the question or sentence to edit; ``target_new`` (required): the answer the
  edit must install;
- ``ground_truth``: the original answer, as a string, a list of strings, or a list of lists of
  aliases (KnowEdit's WikiData files); absent in knowledge-insertion files (wiki_recent);
- ``rephrase_prompt`` (optional): one paraphrase (zsRE's generality probe);
- ``generate_prompt`` (optional): more paraphrases (a list; blank entries are dropped);
- ``locality`` (optional): an object mapping a probe kind (``Relation_Specificity``,
  ``Forgetfulness``, ...) to a list of ``{prompt, ground_truth}``: questions an edit must not change;
- ``portability`` (optional): the same shape (``Reasoning``, ``Subject_Aliasing``,
  ``Logical_Generalization``, ...): questions whose answer should follow from the edit;
- ``subject`` (optional); anything else (``cond`` ...) is ignored.

Every record is checked before anything runs: a malformed one raises :class:`DataError` naming the
file, the record index and the field. See ../shared/data/README.md for the zsRE dev file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

PROBE_GROUPS = ("locality", "portability")


@dataclass
class Probe:
    """A question of a locality or portability group and its accepted answers (first: canonical)."""

    prompt: str
    ground_truth: list[str]


@dataclass
class EditRecord:
    """One edit: ``prompt`` should answer ``target_new`` instead of ``ground_truth``.

    Attributes:
        index: position of the record in its file (for error messages and reports).
        prompt: the question to edit.
        ground_truth: the original answer(s), first the canonical one; empty when the file has none
            (knowledge insertion).
        target_new: the answer the edit must install.
        rephrase_prompt: one held-out paraphrase (the classic generality probe), or None.
        generate_prompts: more paraphrases (a stronger generality probe); may be empty.
        locality: probe kind (e.g. ``"Relation_Specificity"``) → questions that must not change.
        portability: probe kind (e.g. ``"Reasoning"``) → questions whose answer follows from the edit.
        subject: the record's subject, or "".
    """

    index: int
    prompt: str
    ground_truth: list[str]
    target_new: str
    rephrase_prompt: str | None = None
    generate_prompts: list[str] = field(default_factory=list)
    locality: dict[str, list[Probe]] = field(default_factory=dict)
    portability: dict[str, list[Probe]] = field(default_factory=dict)
    subject: str = ""

    @property
    def original_answer(self) -> str:
        """The answer the unedited model is expected to give: ``ground_truth[0]``, else ``target_new``."""
        return self.ground_truth[0] if self.ground_truth else self.target_new


class DataError(ValueError):
    """A data file that is not in the KnowEdit format; the message names the record and field."""


def shipped_data_path(name: str) -> Path:
    """A JSON file shipped as package data in ``melo_fast/eval/data/``."""
    return Path(str(resources.files("melo_fast.eval").joinpath("data", name)))


def demo_data_path() -> Path:
    """The MiniLM demo's edit set, shipped as package data (``melo_fast/eval/data/demo_facts.json``)."""
    return shipped_data_path("demo_facts.json")


def load_records(path: str | Path | None = None, limit: int | None = None) -> list[EditRecord]:
    """Read and validate a KnowEdit file.

    Args:
        path: the JSON file; None loads the shipped MiniLM demo set.
        limit: keep only the first ``limit`` records (None or 0: all).

    Raises:
        DataError: the file is missing, not JSON, not a list, or a record lacks a field or has the
            wrong type (the message names the record index and the field).
    """
    path = demo_data_path() if path is None else Path(path)
    if limit is not None and limit < 0:
        raise DataError(f"--limit must be >= 0, got {limit}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise DataError(f"data file {path} is not valid JSON: {err}") from None
    if not isinstance(raw, list):
        raise DataError(f"data file {path} must hold a JSON list of records, found a {type(raw).__name__}")
    if limit:
        raw = raw[:limit]
    records = [_parse(path, i, item) for i, item in enumerate(raw)]
    if not records:
        raise DataError(f"data file {path} holds no records")
    return records


def _parse(path: Path, index: int, item) -> EditRecord:
    where = f"{path.name} record {index}"

    def fail(field_name: str, what: str):
        raise DataError(f"{where}: field {field_name!r} {what}")

    if not isinstance(item, dict):
        raise DataError(f"{where}: a record must be a JSON object, found a {type(item).__name__}")

    def text(name: str, value, required: bool = True) -> str | None:
        if value is None:
            if required:
                fail(name, "is missing")
            return None
        if not isinstance(value, str) or not value.strip():
            fail(name, f"must be a non-empty string, found {value!r}")
        return value

    def answers(name: str, value, required: bool) -> list[str]:
        """A string, a list of strings, or a list of lists of aliases → the accepted answers, in order."""
        if value is None:
            if required:
                fail(name, "is missing")
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            fail(name, f"must be a string or a list of strings, found {value!r}")
        flat = [a for item in items for a in (item if isinstance(item, list) else [item])]
        if not all(isinstance(a, str) and a.strip() for a in flat):
            fail(name, f"must hold non-empty strings (or lists of them), found {value!r}")
        if not flat:
            fail(name, "must not be empty")
        return list(dict.fromkeys(flat))  # aliases repeated across lists count once

    def paraphrases(name: str, value) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(name, f"must be a list of strings, found {value!r}")
        return [v for v in value if v.strip()]  # the KnowEdit zsRE dump interleaves some lists with " "

    def probe_groups(group: str) -> dict[str, list[Probe]]:
        raw = item.get(group)
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            fail(group, f"must be an object mapping a probe kind (e.g. 'Relation_Specificity') to a list, "
                        f"found {raw!r}")
        kinds = {}
        for kind, probes in raw.items():
            if not isinstance(probes, list):
                fail(f"{group}.{kind}", f"must be a list of {{prompt, ground_truth}}, found {type(probes).__name__}")
            parsed = []
            for j, probe in enumerate(probes):
                name = f"{group}.{kind}[{j}]"
                if not isinstance(probe, dict):
                    fail(name, f"must be an object with 'prompt' and 'ground_truth', found {probe!r}")
                parsed.append(Probe(text(f"{name}.prompt", probe.get("prompt")),
                                    answers(f"{name}.ground_truth", probe.get("ground_truth"), required=True)))
            if parsed:
                kinds[kind] = parsed
        return kinds

    subject = item.get("subject")
    return EditRecord(
        index=index,
        prompt=text("prompt", item.get("prompt")),
        ground_truth=answers("ground_truth", item.get("ground_truth"), required=False),
        target_new=text("target_new", item.get("target_new")),
        rephrase_prompt=text("rephrase_prompt", item.get("rephrase_prompt"), required=False),
        generate_prompts=paraphrases("generate_prompt", item.get("generate_prompt")),
        locality=probe_groups("locality"),
        portability=probe_groups("portability"),
        subject=subject if isinstance(subject, str) else "",
    )


def split_edits(records: list[EditRecord], holdout: float) -> tuple[list[EditRecord], list[EditRecord]]:
    """``(edited, held_out)``: every ``round(1/holdout)``-th record is held out (never edited).

    Held-out records are locality probes: their questions must keep the unedited model's answers.
    Interleaving (rather than a tail) spreads them over the file, so they share subjects and
    relations with edited records, as unrelated traffic would.
    """
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if holdout == 0 or len(records) < 2:
        return list(records), []
    every = max(2, round(1 / holdout))
    held = [r for i, r in enumerate(records) if i % every == every - 1]
    edited = [r for i, r in enumerate(records) if i % every != every - 1]
    return edited, held


def label_space(records: list[EditRecord]) -> list[str]:
    """Every distinct answer of ``records`` (ground truths, new targets, locality answers), sorted."""
    answers = set()
    for record in records:
        answers.update(record.ground_truth)
        answers.add(record.target_new)
        for probes in record.locality.values():
            for probe in probes:
                answers.update(probe.ground_truth)
    return sorted(answers)
