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


def current_lookup_lines(tune: dict | None) -> list[str]:
    """The sweep's time for the tiles ``scan_config`` chooses now (the launcher's production choice)."""
    if tune is None or not isinstance(tune.get("lookup"), list):
        return []
    from melo_fast.ops.triton.vecdb_search import scan_config

    rows = []
    for r in tune["lookup"]:
        if not isinstance(r["config"], dict) or r.get("split_factor") not in (None, 4):
            continue
        chosen = scan_config(r["Q"], 10**6, 768, r["keys"] == "fp32", True)
        if all(chosen.get(k) == v for k, v in r["config"].items()):
            rows.append([r["keys"], str(r["Q"]), _ms(r["ms"]), f"{r['x_floor']:.2f}×", f"{r['ids_equal']}/{r['of']}"])
    if not rows:
        return []
    return ["The tiles the launcher chooses now (`scan_config`), as the sweep timed them (C = 1M, d = 768):", "",
            *_table(["keys", "Q", "time", "× HBM floor", "ids equal to torch"], rows), ""]  # fmt: skip


def _row(report: dict, check: str, contains: str = "") -> dict | None:
    return next((r for r in _rows(report, check) if contains in r["what"]), None)


def why_lines(report: dict, tune: dict | None) -> list[str]:
    """Where a target is not met, the reason the figures give (each number read from the JSON)."""
    missed = [r for r in report["rows"] if r["section"] == "target" and r["verdict"] == "not met"]
    if not missed:
        return []
    host = (tune or {}).get("host") or {}
    profiles = (tune or {}).get("train_profile") or {}
    e2e_profile = (tune or {}).get("e2e_profile") or {}
    lines = ["### Where a target is not met, and why (from the figures)", ""]
    sweep = [r for r in (tune or {}).get("lookup", []) if isinstance(r, dict) and isinstance(r.get("config"), dict)]
    lookup = _row(report, "lookup_fp32", "Q=32")
    if lookup and lookup["verdict"] == "not met":
        speedups = []
        for q in sorted({r["Q"] for r in sweep}):
            at_q = [r for r in sweep if r["keys"] == "fp32" and r["Q"] == q]
            ieee = min((r["ms"] for r in at_q if r["config"]["DOT_PRECISION"] == "ieee"), default=None)
            tf32x3 = min((r["ms"] for r in at_q if r["config"]["DOT_PRECISION"] == "tf32x3"), default=None)
            if ieee and tf32x3:
                speedups.append(f"{ieee / tf32x3:.1f}× at Q = {q}")
        lines.append(
            f"- **fp32 lookup**: {lookup['figure']}. IEEE fp32 dots in Triton are FMA loops, so the scan is "
            "bound by arithmetic, not by reading the centers. In the sweep the fastest TF32x3 tile beats the fastest "
            f"IEEE one by {', '.join(speedups) or 'an unmeasured factor'}, with every id equal; it is still above "
            "2× the floor, since TF32x3 does three tensor-core products per pair."
        )
    bf16 = _row(report, "lookup_bf16", "Q=32")
    bf16_rows = [r for r in sweep if r["keys"] == "bf16"]
    if bf16 and bf16["verdict"] == "not met" and bf16_rows:
        by_q, more_programs = [], False
        for q in sorted({r["Q"] for r in bf16_rows}):
            best = min((r for r in bf16_rows if r["Q"] == q), key=lambda r: r["ms"])
            by_q.append(f"{best['x_floor']:.2f}× at Q = {q} ({best['split_factor']} programs per SM)")
            more_programs |= best["split_factor"] > 4
        lines.append(
            f"- **bf16 lookup**: {bf16['figure']}. The best of the {len(bf16_rows)} tile and split variants the "
            f"sweep tried: {'; '.join(by_q)} (one timing each, not repeated)."
            + (" The launcher keeps 4 programs per SM until a repeated run confirms the gain of more." if more_programs
               else "")
            + " Finding the rest of the gap needs hardware counters (no profiler run here)."
        )  # fmt: skip
    addon = _row(report, "addon", "triton, in place")
    if addon and addon["verdict"] == "not met":
        floor_share = addon["data"]["floor_ms"] / addon["data"]["gemm_ms"]
        per_call = host.get("block_lora in place (dispatcher)")
        lines.append(
            f"- **add-on**: {addon['figure']}. Its own floor (read x and the output, write the output) is already "
            f"{100 * floor_share:.0f}% of the base GEMM, above the 10% target; and one do_bench call of it measures "
            "the host as much as the GPU"
            + (f": {per_call:.0f} µs of host time per call at decode size (gpu_tune)." if per_call else ".")
        )
    decode = _row(report, "decode", "eager")
    graph = _row(report, "decode", "CUDA graph")
    if decode and decode["verdict"] == "not met":
        lines.append(
            f"- **decode**: {decode['figure']} eagerly, "
            + (f"{graph['figure']} replayed from a CUDA graph: " if graph else "")
            + "the two extra launches cost more host time than the 8 µs GEMM they follow; without launch gaps "
            "the add-on is two small kernels after one small GEMM."
        )
    train = [r for r in _rows(report, "fwd_bwd") if r["verdict"] == "not met"]
    long_profile = profiles.get("long", {}).get("kernels", {})
    if train:
        device_us = sum(v for k, v in long_profile.items() if k.startswith("_block_lora"))
        lines.append(
            "- **forward + backward**: " + "; ".join(r["figure"] for r in train) + ". The Triton times are the same "
            "at both shapes, the mark of a host-bound measurement"
            + (f"; by torch.profiler its kernels take {device_us:.0f} µs of device time per step at the first shape"
               if device_us else "") + "."
        )  # fmt: skip
    e2e = _row(report, "e2e")
    if e2e and e2e["verdict"] == "not met" and "patched" in e2e_profile:
        patched, unpatched = e2e_profile["patched"], e2e_profile["unpatched"]
        scan = patched["kernels"].get("_vecdb_search_scan_kernel", 0.0)
        extra = patched["device_us_per_step_total"] - unpatched["device_us_per_step_total"]
        lines.append(
            f"- **end to end**: {e2e['figure']}. By torch.profiler the patched forward takes {extra:.0f} µs more "
            f"device time than the unpatched one, {scan:.0f} µs of it in the lookup's scan (fp32 keys, IEEE dots "
            "at that commit; the TF32x3 scan targets this, and was not measured end to end)."
        )
    return lines + [""]


def section() -> list[str]:
    """The ``## GPU`` section of BENCHMARKS.md."""
    lines = ["## GPU", ""]
    current = _read(CHECK)
    earlier = earlier_checks()
    report = current or (earlier[-1][1] if earlier else None)
    if report is None:
        return lines + ["*Not run: `PYTHONPATH=. python benchmarks/gpu_check.py --out benchmarks/gpu` on a CUDA "
                        "machine (CI has none).*", ""]  # fmt: skip
    tune = _read(TUNE)
    if current is None:
        lines += [
            f"**No GPU run of the current code is committed** (`benchmarks/gpu/gpu_check.json` is absent): the "
            f"figures below are from the run at commit {report['versions'].get('commit')}. The kernels and the "
            "serving path changed after it (see `git log melo_fast/ops melo_fast/routing`); "
            "`python benchmarks/gpu_check.py --out benchmarks/gpu` on a lent GPU measures them again.", "",
        ]  # fmt: skip
        return lines + check_lines(report) + why_lines(report, tune) + tune_lines(tune) + current_lookup_lines(tune)
    return (lines + check_lines(report) + why_lines(report, tune) + before_after_lines(report) + tune_lines(tune)
            + current_lookup_lines(tune))  # fmt: skip
