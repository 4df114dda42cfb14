"""Markdown helpers every section of EVALUATION.md uses: numbers, tables, a report's method table and database
line, where a report was made, and links relative to the document."""

from __future__ import annotations

import math
from pathlib import Path

from melo_fast.eval.report import TABLE_COLUMNS, present_columns


def f3(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def key_name(position) -> str:
    return "−1" if position == -1 else str(position)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def method_label(name: str, result: dict) -> str:
    return {"unedited": "unedited", "melo": "MELO"}.get(name, f"LoRA (rank {result.get('rank')})")


def methods_table(report: dict, columns=TABLE_COLUMNS, seconds: bool = True) -> list[str]:
    """Method × metric table of the ``columns`` the report has (and edit / eval seconds)."""
    shown = present_columns(report["methods"], columns)
    header = ["method", *(title for _, title in shown)] + (["edit s", "eval s"] if seconds else [])
    rows = [[method_label(name, result), *(f3(result["metrics"].get(key)) for key, _ in shown)]
            + ([f"{result['edit_seconds']:.1f}", f"{result['eval_seconds']:.1f}"] if seconds else [])
            for name, result in report["methods"].items()]
    return table(header, rows)


def database_line(report: dict, when: str) -> str:
    db = report["methods"]["melo"]["db"]
    return (f"Database {when}: {db['clusters']} clusters, {db['points']} points, {db['conflicts']} conflicts, "
            f"{db['forgotten_points']} forgotten points, {db.get('superseded_points', 0)} superseded points "
            f"(re-edits), {db['blocks']} blocks.")


def made_at(report: dict) -> str:
    source = report.get("provenance") or {}
    git = source.get("git")
    if not git:
        return f"{source.get('date', 'unknown date')}, outside a git checkout"
    changes = git.get("changed") or []
    state = "source clean" if not changes else "uncommitted source changes: " + ", ".join(f"`{c}`" for c in changes)
    return f"{source.get('date')}, commit `{git['commit'][:10]}` ({state})"



def rel(path: Path, out: Path) -> str:
    return Path(path).resolve().relative_to(out.resolve().parent).as_posix()
