"""The report: the exit status of a run, and its two markdown tables."""

from __future__ import annotations

from .context import Row

# Verdicts that turn a run red: a check failed, or raised.
FAILED = ("FAIL", "ERROR")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    """The two tables: checks (correctness, compile, information), then the targets."""
    head = (
        f"GPU check on {report['device']} ({', '.join(f'{k} {v}' for k, v in report['versions'].items())}); "
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget; exit status {report['exit_status']}"
    )
    if report["dry_run"]:
        head = (
            "DRY RUN on the CPU (Triton interpreter, tiny shapes): timings are CPU figures of tiny problems, "
            "not GPU figures.\n" + head
        )
    lines = [head, "", "| check | what | result | expected | verdict | note |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["section"] != "target":
            lines.append(
                "| "
                + " | ".join(_cell(row[k]) for k in ("check", "what", "figure", "target", "verdict", "note"))
                + " |"
            )
    lines += ["", "| target (GPU-run issue) | figure | target | verdict | note |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["section"] == "target":
            lines.append(
                "| " + " | ".join(_cell(row[k]) for k in ("what", "figure", "target", "verdict", "note")) + " |"
            )
    return "\n".join(lines) + "\n"


def exit_status(rows: list[Row], selected_all: bool) -> int:
    """0: every check ran and passed; 1: one failed or broke; 2: none failed but some did not run (budget,
    ``--only``). Target verdicts (met / not met) are findings: they never change it."""
    if any(row.verdict in FAILED for row in rows):
        return 1
    if any(row.verdict == "not run" for row in rows) or not selected_all:
        return 2
    return 0
