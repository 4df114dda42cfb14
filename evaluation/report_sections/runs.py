"""The runs EVALUATION.md reads, one ``python -m melo_fast`` command each (:data:`RUNS`), and their reports as
found in ``evaluation/runs/`` (:class:`Reports`: usable, or why not: missing or stale)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

DEV_DATA = "../shared/data/zsre_knowedit_dev.json"  # from the repository root
QUESTIONS_DATA = "evaluation/data/llm_facts_questions.json"  # the shipped LLM facts, asked as questions
# Arguments that do not change a figure (where the report goes, console output, CPU threads).
IGNORED_ARGUMENTS = {"out", "no_progress", "examples", "threads"}
# What an argument a report does not record meant when it was made: reports older than `--model` were
# MiniLM runs; any other argument added since has its default.
LEGACY_ARGUMENTS = {"model": "minilm"}


@dataclass(frozen=True)
class Run:
    """One ``python -m melo_fast`` command whose JSON report EVALUATION.md reads."""

    name: str
    args: tuple[str, ...]
    what: str

    @property
    def argv(self) -> list[str]:
        return [*self.args, "--out", f"evaluation/runs/{self.name}"]

    @property
    def command(self) -> str:
        return "python -m melo_fast " + shlex.join(self.argv)


def _router(router: str, targets: str) -> tuple[str, ...]:
    return ("--router", router, "--targets", targets)


_MELO_SWEEP = ("--methods", "unedited,melo", "--sweep")
_LAYER3 = _router("encoder.layer.3.output.dense", "encoder.layer.4.output.dense,encoder.layer.5.output.dense")
_LAYER5_OUTPUT = _router("encoder.layer.5.output.dense", "encoder.layer.5.output.dense")
_MINILM = ("demo", "--model", "minilm")
RUNS = {run.name: run for run in (
    Run("smollm2_demo", ("demo", "--threads", "1"), "SmolLM2: the shipped everyday facts (`make demo`), every method"),
    Run("smollm2_chat", ("demo", "--chat", "--data", QUESTIONS_DATA, "--methods", "unedited,melo", "--threads", "1"),
        "SmolLM2: the same facts asked as questions through the chat template"),
    Run("smollm2_dev", ("demo", "--data", DEV_DATA, "--limit", "200", "--threads", "1"),
        "SmolLM2: the first 200 zsRE dev records, every method"),
    Run("demo", (*_MINILM, "--threads", "1"), "MiniLM: the shipped set, every method"),
    Run("dev", (*_MINILM, "--data", DEV_DATA, "--sweep", "--threads", "1"),
        "MiniLM: zsRE dev data, every method, and the init_radius x key position sweep"),
    Run("demo_radius_0.8", (*_MINILM, "--init-radius", "0.8", "--methods", "unedited,melo", "--threads", "1"),
        "MiniLM: the shipped set with a fixed init_radius"),
    Run("demo_scale_20", (*_MINILM, "--scale", "20", "--methods", "unedited,melo", "--threads", "1"),
        "MiniLM: the shipped set with MELO's zsRE block scale"),
    Run("router_layer3_400", (*_MINILM, "--data", DEV_DATA, "--limit", "400", *_MELO_SWEEP, *_LAYER3, "--threads", "1"),
        "MiniLM router comparison: a router in layer 3"),
    Run("router_default_400", (*_MINILM, "--data", DEV_DATA, "--limit", "400", *_MELO_SWEEP, "--threads", "1"),
        "MiniLM router comparison: the demo's router"),
    Run("router_layer5_output_400",
        (*_MINILM, "--data", DEV_DATA, "--limit", "400", *_MELO_SWEEP, *_LAYER5_OUTPUT, "--threads", "1"),
        "MiniLM router comparison: the last layer's output"),
)}


class Reports:
    """The reports of :data:`RUNS` found in ``runs_dir``; ``problem(name)`` says why one is unusable."""

    def __init__(self, runs_dir: Path):
        from melo_fast.cli import build_parser
        from melo_fast.eval.arguments import recorded_arguments

        self.data: dict[str, dict] = {}
        self.problems: dict[str, str] = {}
        parser = build_parser()
        for name, run in RUNS.items():
            path = runs_dir / name / "demo_report.json"
            if not path.is_file():
                self.problems[name] = "not yet run"
                continue
            report = json.loads(path.read_text())
            expected = recorded_arguments(parser.parse_args(run.argv))
            defaults = recorded_arguments(parser.parse_args([run.args[0]]))
            recorded = {**defaults, **LEGACY_ARGUMENTS, **(report.get("arguments") or {})}
            differ = sorted(key for key in (set(expected) | set(recorded)) - IGNORED_ARGUMENTS
                            if expected.get(key) != recorded.get(key))
            if differ:
                shown = ", ".join(f"{key} {recorded.get(key)!r} instead of {expected.get(key)!r}" for key in differ)
                self.problems[name] = f"stale ({path.relative_to(runs_dir.parent)} was made with {shown}); rerun"
                continue
            self.data[name] = report

    def __getitem__(self, name: str) -> dict:
        return self.data[name]

    def has(self, *names: str) -> bool:
        return all(name in self.data for name in names)

    def missing_text(self, name: str) -> str:
        """What is wrong with report ``name`` and the command that makes it."""
        return f"*{self.problems[name]}: `{RUNS[name].command}`*"

    def missing(self, *names: str) -> list[str]:
        """A Markdown list: one item per unusable report among ``names``, then a blank line."""
        return [f"- {self.missing_text(name)}" for name in names if name not in self.data] + [""]
