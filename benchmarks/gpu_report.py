"""The GPU part of ``BENCHMARKS.md``, from the JSON a lent GPU wrote (``benchmarks/gpu/``).

CI never has a GPU: ``gpu_check.py`` and ``gpu_tune.py`` run on a lent device (one prepared call each)
and their JSON is committed here. ``report.py`` calls :func:`section`; every figure below is read from
those files, and a missing file gives the command that makes it, never a figure.

- ``gpu/gpu_check.json``: the checks and targets on the current kernels (``gpu_check.py``);
- ``gpu/gpu_check_<commit>.json``: earlier runs, for before/after rows;
- ``gpu/gpu_tune.json``: the tile / precision sweep and the per-kernel profiles behind the launch configurations.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "gpu"
CHECK = HERE / "gpu_check.json"
TUNE = HERE / "gpu_tune.json"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ms(value: float) -> str:
    return f"{value * 1e3:.1f} µs" if value < 1 else f"{value:.3f} ms"


def _versions(report: dict) -> str:
    v = report["versions"]
    return (f"{report['device']}; torch {v.get('torch')}, Triton {v.get('triton')}, transformers "
            f"{v.get('transformers')}, commit {v.get('commit')}")  # fmt: skip


def _rows(report: dict, check: str) -> list[dict]:
    return [row for row in report["rows"] if row["check"] == check]


def earlier_checks() -> list[tuple[str, dict]]:
    """``(commit, report)`` of every earlier gpu_check run kept beside the current one."""
    out = []
    for path in sorted(HERE.glob("gpu_check_*.json")):
        out.append((path.stem.removeprefix("gpu_check_"), json.loads(path.read_text())))
    return out


def check_lines(report: dict) -> list[str]:
    lines = [
        f"`PYTHONPATH=. python benchmarks/gpu_check.py` on {_versions(report)}: {report['elapsed_s']:.0f} s of a "
        f"{report['budget_s']:.0f} s budget, exit status {report['exit_status']} (0: every check ran and passed).", "",
        "**Correctness and compilation**", "",
    ]
    rows = [
        [_cell(r["check"]), _cell(r["what"]), _cell(r["figure"]), _cell(r["verdict"]), _cell(r["note"][:160])]
        for r in report["rows"] if r["section"] in ("correctness", "compile")
    ]  # fmt: skip
    lines += _table(["check", "what", "result", "verdict", "note"], rows) + [""]
    lines += ["**Targets** (timed with `triton.testing.do_bench`: median, L2 flushed before each call)", ""]
    rows = [
        [_cell(r["what"]), _cell(r["figure"]), _cell(r["target"] or "(information)"), _cell(r["verdict"] or ""),
         _cell(r["note"][:160])]
        for r in report["rows"] if r["section"] in ("target", "info") and r["check"] != "environment"
    ]  # fmt: skip
    lines += _table(["what", "measured", "target", "verdict", "note"], rows) + [""]
    environment = {r["what"]: r["figure"] for r in _rows(report, "environment")}
    if environment:
        lines += ["Ceilings measured in the same run: " + "; ".join(f"{k}: {v}" for k, v in environment.items()), ""]
    return lines


def before_after_lines(report: dict) -> list[str]:
    """The target rows of each earlier run next to the current one (same ``what``)."""
    lines = []
    for commit, earlier in earlier_checks():
        then = {r["what"]: r for r in earlier["rows"] if r["section"] == "target"}
        rows = [
            [_cell(r["what"]), _cell(then[r["what"]]["figure"]), _cell(r["figure"])]
            for r in report["rows"] if r["section"] == "target" and r["what"] in then
        ]  # fmt: skip
        if rows:
            lines += [f"**Before and after** (the run at commit {commit}, same device kind and shapes)", ""]
            lines += _table(["what", f"at {commit}", f"at {report['versions'].get('commit')}"], rows) + [""]
    return lines


def tune_lines(tune: dict | None) -> list[str]:
    lines = ["### What the tile sweep and the profiles say (`benchmarks/gpu_tune.py`)", ""]
    if tune is None:
        return lines + ["*Not run: `PYTHONPATH=. python benchmarks/gpu_tune.py --out benchmarks/gpu` on a GPU.*", ""]
    lines += [f"On {tune['device']} (torch {tune['torch']}); every variant's result was checked against the torch "
              "backend (ids equal / relative L2 error) in the same run.", ""]  # fmt: skip
    lookup = [r for r in tune.get("lookup", []) if isinstance(r, dict) and r.get("keys") == "fp32"]
    if lookup:
        best = {}
        for r in lookup:
            precision = r["config"]["DOT_PRECISION"] if isinstance(r["config"], dict) else "launcher"
            key = (precision, r["Q"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
        rows = [[p, str(q), _ms(r["ms"]), f"{r['x_floor']:.2f}×", f"{r['ids_equal']}/{r['of']}"]
                for (p, q), r in sorted(best.items())]  # fmt: skip
        lines += ["fp32 lookup, C = 1M, d = 768: the fastest configuration of each dot precision", ""]
        lines += _table(["precision", "Q", "time", "× HBM floor", "ids equal to torch"], rows) + [""]
    host = tune.get("host")
    if isinstance(host, dict):
        lines += ["Host time per call at decode size (200 calls back to back, one sync): "
                  + "; ".join(f"{k} {v:.1f} µs" for k, v in host.items()), ""]  # fmt: skip
    profile = tune.get("e2e_profile")
    if isinstance(profile, dict) and "patched" in profile:
        patched, unpatched = profile["patched"], profile["unpatched"]
        ours = {k: v for k, v in patched["kernels"].items() if "block_lora" in k or "vecdb" in k}
        lines += [
            "End to end (GPT-2-medium shape, bf16, 32×128 tokens, 10k edits), device time per forward by "
            f"torch.profiler: {patched['device_us_per_step_total'] / 1e3:.2f} ms patched vs "
            f"{unpatched['device_us_per_step_total'] / 1e3:.2f} ms unpatched; melo_fast's kernels: "
            + ", ".join(f"{k} {v:.1f} µs" for k, v in ours.items()) + ".", "",
        ]
    return lines


def section() -> list[str]:
    """The ``## GPU`` section of BENCHMARKS.md."""
    report = _read(CHECK)
    lines = ["## GPU", ""]
    if report is None:
        return lines + ["*Not run: `PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/gpu` on a CUDA "
                        "machine (CI has none).*", ""]  # fmt: skip
    return lines + check_lines(report) + before_after_lines(report) + tune_lines(_read(TUNE))
