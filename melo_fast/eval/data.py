"""Edit records in the KnowEdit zsRE format: load, validate (clear errors), split.

A KnowEdit file is one JSON list; each record has ``prompt``, ``ground_truth`` (list of strings),
``target_new``, ``rephrase_prompt``, ``generate_prompt`` (list) and
``locality.Relation_Specificity`` (list of ``{prompt, ground_truth}``). ``subject``, ``portability``
and ``cond`` may be present and are ignored. See ../shared/data/README.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


@dataclass
class LocalityProbe:
    """A question whose answer an edit must not change."""

    prompt: str
    ground_truth: list[str]


@dataclass
class EditRecord:
    """One edit: ``prompt`` should answer ``target_new`` instead of ``ground_truth``.

    Attributes:
        index: position of the record in its file (for error messages and reports).
        prompt: the question to edit.
        ground_truth: the original answer(s); the first is the canonical one.
        target_new: the answer the edit must install.
        rephrase_prompt: one held-out paraphrase (the classic generality probe).
        generate_prompts: more paraphrases (a stronger generality probe); may be empty.
        locality: questions about the same subject, other relations (must not change).
        subject: the record's subject, or "".
    """

    index: int
    prompt: str
    ground_truth: list[str]
    target_new: str
    rephrase_prompt: str
    generate_prompts: list[str] = field(default_factory=list)
    locality: list[LocalityProbe] = field(default_factory=list)
    subject: str = ""


class DataError(ValueError):
    """A data file that is not in the KnowEdit zsRE format; the message names the record and field."""


def demo_data_path() -> Path:
    """The demo's own edit set, shipped as package data (``melo_fast/eval/data/demo_facts.json``)."""
    return Path(str(resources.files("melo_fast.eval").joinpath("data", "demo_facts.json")))


def load_records(path: str | Path | None = None, limit: int | None = None) -> list[EditRecord]:
    """Read and validate a KnowEdit zsRE file.

    Args:
        path: the JSON file; None loads the shipped demo set.
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

    def text(name: str, value=None, required=True) -> str:
        value = item.get(name) if value is None else value
        if value is None:
            if required:
                fail(name, "is missing")
            return ""
        if not isinstance(value, str) or (required and not value.strip()):
            fail(name, f"must be a non-empty string, found {value!r}")
        return value

    def texts(name: str, value, allow_empty: bool, skip_blank: bool = False) -> list[str]:
        if isinstance(value, str):  # some KnowEdit dumps store a single answer as a bare string
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(name, f"must be a list of strings, found {value!r}")
        if skip_blank:  # the KnowEdit zsRE dump interleaves some paraphrase lists with " " entries
            value = [v for v in value if v.strip()]
        elif not all(v.strip() for v in value):
            fail(name, f"must hold non-empty strings, found {value!r}")
        if not value and not allow_empty:
            fail(name, "must not be empty")
        return list(value)

    locality_raw = item.get("locality", {})
    if not isinstance(locality_raw, dict):
        fail("locality", f"must be an object with a 'Relation_Specificity' list, found {locality_raw!r}")
    probes_raw = locality_raw.get("Relation_Specificity", [])
    if not isinstance(probes_raw, list):
        fail("locality.Relation_Specificity", f"must be a list, found {type(probes_raw).__name__}")
    probes = []
    for j, probe in enumerate(probes_raw):
        name = f"locality.Relation_Specificity[{j}]"
        if not isinstance(probe, dict):
            fail(name, f"must be an object with 'prompt' and 'ground_truth', found {probe!r}")
        probes.append(
            LocalityProbe(
                prompt=text(f"{name}.prompt", probe.get("prompt", "")),
                ground_truth=texts(f"{name}.ground_truth", probe.get("ground_truth"), allow_empty=False),
            )
        )
    return EditRecord(
        index=index,
        prompt=text("prompt"),
        ground_truth=texts("ground_truth", item.get("ground_truth"), allow_empty=False),
        target_new=text("target_new"),
        rephrase_prompt=text("rephrase_prompt"),
        generate_prompts=texts("generate_prompt", item.get("generate_prompt", []), allow_empty=True, skip_blank=True),
        locality=probes,
        subject=text("subject", required=False) if isinstance(item.get("subject", ""), str) else "",
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
        for probe in record.locality:
            answers.update(probe.ground_truth)
    return sorted(answers)
