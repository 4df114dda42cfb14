"""The edit-speed part of ``BENCHMARKS.md``: MELO's fixed loop against the default, from ``edit_speed.json``.

``edit_speed.py`` (a script, not pytest-benchmark: one run takes tens of minutes) writes the JSON beside
this file; ``report.py`` calls :func:`section`. Every figure is read from the JSON; a missing file gives
the command that makes it, never a figure.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
EDIT_SPEED = HERE / "edit_speed.json"
QUALITY_METRICS = ("es", "err", "locality", "generality_rephrase", "generality_generate", "target_repetition")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def timing_lines(data: dict) -> list[str]:
    rows = []
    for model, result in data["models"].items():
        fixed, default = result["configs"]["melo_fixed_loop"], result["configs"]["default"]
        rows.append([
            model,
            f"{statistics.median(fixed['seconds']):.2f} s ({statistics.median(fixed['steps']):.0f} steps)",
            f"{statistics.median(default['seconds']):.2f} s ({statistics.median(default['steps']):.0f} steps)",
            f"{result['speedup']:.2f}×",
        ])  # fmt: skip
    return _table(["model", "MELO's fixed loop", "default", "speedup"], rows) + [""]


def quality_lines(quality: dict | None) -> list[str]:
    if not quality:
        return []
    lines = [
        f"Quality of the same two configurations on SmolLM2-135M-Instruct, zsRE dev records "
        f"({quality['setup'].get('edited', '?')} edits in batches of 10, "
        f"{quality['setup'].get('held_out', '?')} held out), by the evaluation harness:", "",
    ]  # fmt: skip
    rows = []
    for name in ("melo_fixed_loop", "default"):
        metrics, seconds = quality[name]["metrics"], quality[name]["edit_seconds"]
        cells = [f"{metrics[m]:.3f}" if m in metrics else "–" for m in QUALITY_METRICS]
        rows.append([name, *cells, f"{seconds:.0f}"])
    return lines + _table(["configuration", *QUALITY_METRICS, "edit s"], rows) + [""]


def section() -> list[str]:
    """The ``## Edit speed`` section of BENCHMARKS.md."""
    lines = ["## Edit speed: MELO's fixed loop vs the default", ""]
    data = json.loads(EDIT_SPEED.read_text()) if EDIT_SPEED.is_file() else None
    if data is None:
        return lines + ["*Not run: `PYTHONPATH=. python benchmarks/edit_speed.py` (about an hour on 2 cores).*", ""]
    source = data.get("source", {})
    changed = source.get("changed") or []
    lines += [
        f"`{data['command']}` at commit {str(source.get('commit', '?'))[:10]}"
        + (f" (uncommitted changes to {', '.join(changed)})" if changed else "")
        + f"; {data['machine']}. Seconds per edit batch of 10 zsRE dev edits (median over the batches), the two "
        "configurations run back to back on the same batches, so both see the same machine load. MELO's loop: "
        f"`{data['configs']['melo_fixed_loop']}`; the default also replays the frozen blocks below the first target "
        "and stops once the edit has converged, and trains on the unedited model's continuation after each target "
        "(decoder-only models).",
        "",
    ]
    return lines + timing_lines(data) + quality_lines(data.get("quality"))
