"""Turn pytest-benchmark JSON into ``BENCHMARKS.md`` (tables, ratios, targets) and PNG plots.

    python benchmarks/report.py [results.json ...] [--out BENCHMARKS.md] [--plots benchmarks/plots]
                                [--stat min|median|mean]

Reads one or more ``--benchmark-json`` files (default ``benchmarks/results.json``). Every number in the
output is computed from them: one table per benchmark group with a ratio column against the group's
baseline (``extra_info["baseline"]``; for groups without one, the ``reference`` backend, else ``torch``),
a "Targets" section (met / not met, with the measured ratio), and plots in ``--plots``.
Ratios are ``baseline time / row time`` (> 1: the row is faster), from the ``--stat`` statistic of
each row (default ``min``: on a shared machine other processes only ever add time).

The rows and their formats are in ``report_rows.py``, the targets in ``report_targets.py``, the plots in
``report_plots.py``; the lifelong, edit-speed and GPU sections in ``lifelong_report.py``,
``edit_speed_report.py`` and ``gpu_report.py``. This module lays out the tables and writes the document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/report.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from benchmarks import edit_speed_report, gpu_report  # noqa: E402
from benchmarks import lifelong_report as lifelong  # noqa: E402
from benchmarks.report_plots import make_plots  # noqa: E402
from benchmarks.report_rows import (  # noqa: E402
    LINEAR_CASE,
    Row,
    baseline_of,
    curve,  # noqa: F401 (plot_db_scaling.py reads it from this module)
    fmt_bytes,
    fmt_ratio,
    fmt_time,
    groups_of,
    load,
    table,
)
from benchmarks.report_targets import (  # noqa: E402
    TARGET_E2E,
    TARGET_EDIT,
    TARGET_INSERT_OVER_SEARCH,  # noqa: F401 (plot_db_scaling.py reads it from this module)
    TARGET_LOOKUP_RATIO,
    Target,
    database_targets,
    e2e_targets,
    edit_targets,
    layer_targets,
    linear_targets,
    lookup_targets,
)

# ---- markdown ----------------------------------------------------------------------------------------------


def group_table(rows: list[Row], stat: str) -> str:
    base = baseline_of(rows)
    linear = next((r for r in rows if r.case == LINEAR_CASE), None)
    has = {key: any(r.get(key) is not None for r in rows) for key in
           ("tokens", "new_tokens", "peak_tensor_bytes", "train_state_bytes", "GB/s (centers read once)", "paired")}
    header = ["case", stat, "median", "rounds"]
    if base is not None:
        header.append(f"× vs {base.case}")
    if has["paired"]:
        against = next(str(r.get("paired").get("case", "baseline")) for r in rows if r.get("paired"))
        header.append(f"× vs {against.removesuffix(', interleaved')}, interleaved")
    if linear is not None:
        header.append("LoRA add-on (− nn.Linear)")
    if has["tokens"]:
        header.append("tokens/s")
    if has["new_tokens"]:
        header.append("ms / new token")
    if has["GB/s (centers read once)"]:
        header.append("GB/s (centers)")
    if has["peak_tensor_bytes"]:
        header.append("peak tensor memory (torch.profiler)")
    if has["train_state_bytes"]:
        header.append("train state (analytic)")
    faults = any(r.faults is not None for r in rows)
    if faults:
        header.append("minor page faults / call")
    lines = []
    for row in rows:
        line = [row.case + (" (baseline)" if row is base else ""), fmt_time(row.time), fmt_time(row.median),
                str(row.rounds)]
        if base is not None:
            line.append(fmt_ratio(base.time / row.time))
        if has["paired"]:
            line.append(fmt_ratio(row.paired_ratio))
        if linear is not None:
            line.append("–" if row is linear else fmt_time(row.time - linear.time))
        if has["tokens"]:
            line.append(f"{row.get('tokens') / row.time:,.0f}" if row.get("tokens") else "–")
        if has["new_tokens"]:
            line.append(f"{row.time / row.get('new_tokens') * 1e3:.1f}" if row.get("new_tokens") else "–")
        if has["GB/s (centers read once)"]:
            gbps = row.get("GB/s (centers read once)")
            line.append("–" if gbps is None else f"{gbps:g}")
        if has["peak_tensor_bytes"]:
            line.append(fmt_bytes(row.get("peak_tensor_bytes")))
        if has["train_state_bytes"]:
            line.append(fmt_bytes(row.get("train_state_bytes")))
        if faults:
            line.append("–" if row.faults is None else f"{row.faults:,}")
        lines.append(line)
    return table(header, lines)


def peft_adapter_note(rows: list[Row]) -> list[str]:
    """Why PEFT with one active adapter can be slower than with 64 per-sample adapters, from the data.

    Only stated when the run shows it: the single-adapter row slower, and both rows with page faults.
    """
    layer = [r for r in rows if r.get("op") == "layer" and r.get("backend") == "peft"]
    single = next((r for r in layer if r.get("peft_mode") == "single"), None)
    mixed = next((r for r in layer if r.get("peft_mode") == "per-sample" and r.get("distinct") == 64), None)
    if single is None or mixed is None or single.time <= mixed.time:
        return []
    note = (f"PEFT with one active adapter ({fmt_time(single.time)}) is slower here than with "
            f"{mixed.get('distinct')} per-sample adapters ({fmt_time(mixed.time)}).")
    if single.faults is not None and mixed.faults is not None and single.faults > mixed.faults:
        note += (f" Per call, the one-adapter forward takes {single.faults:,} minor page faults (fresh memory from the "
                 f"OS), the per-sample forward {mixed.faults:,}: PEFT's one-adapter path adds "
                 "`result + lora_B(lora_A(x)) * scaling` out of place, new tensors of the output's size, while the "
                 "per-sample path's temporaries are one sample's size.")
    return [note, ""]


SECTIONS = [
    ("Layer: one patched target layer vs nn.Linear vs PEFT", lambda g: g.startswith("layer ")),
    ("End to end: patched vs unpatched models", lambda g: g.startswith("e2e ")),
    ("Editing: one edit batch, block-only vs full-rank training", lambda g: g.startswith("edit ")),
    ("Scaling: lookup time vs stored keys", lambda g: g.startswith("lookup scaling")),
    ("Scaling: forward time vs edits", lambda g: g.startswith("forward vs edits")),
    ("Scaling: database insert, save and load vs stored keys",
     lambda g: g.startswith(("insert vs search", "save ", "load "))),
    ("Ops (test_bench_ops.py): vecdb_search and block_lora per backend", lambda g: True),
]


def environment(rows: list[Row], metas: list[dict]) -> str:
    lines = []
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    threads = sorted({r.get("threads") for r in rows if r.get("threads") is not None})
    vers = next((r.get("versions") for r in rows if r.get("versions")), None) or {}
    lines.append(f"- device: {', '.join(devices) or 'unknown'}" + (f"; torch threads: {threads}" if threads else ""))
    if vers:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    timers = sorted({str((r.raw.get("options") or {}).get("timer")) for r in rows})
    lines.append(f"- timer: {', '.join(timers)}" + (
        " (CPU time of this process: with 1 thread, the wall time it would take on an idle machine; used here "
        "because the machine was shared with other jobs)" if "time.process_time" in timers else ""))
    isa = sorted({r.get("isa") for r in rows if r.get("isa")})
    if isa:
        lines.append(f"- C++ kernels ISA: {', '.join(isa)}")
    for meta in metas:
        cpu = ((meta.get("machine_info") or {}).get("cpu") or {}).get("brand_raw", "")
        lines.append(f"- `{meta['path']}`: {meta.get('datetime')}, {source_of(meta)}, pytest-benchmark "
                     f"{meta.get('version')}{', ' + cpu if cpu else ''}")
    return "\n".join(lines)


def source_of(meta: dict) -> str:
    """The commit the numbers come from and, if any, the uncommitted files that could change them."""
    source = meta.get("melo_fast_source")
    if source:
        changed = source.get("changed") or []
        return f"commit {source['commit'][:10]} " + (
            "(package, kernels and suites as committed)" if not changed else
            "**plus uncommitted changes** to " + ", ".join(f"`{c}`" for c in changed))
    commit = meta.get("commit_info") or {}  # an older JSON: pytest-benchmark's own record
    return (f"commit {str(commit.get('id', ''))[:10]} (pytest-benchmark's record; "
            f"{'uncommitted changes somewhere in the tree' if commit.get('dirty') else 'clean tree'}, files unknown)")


def render(rows: list[Row], metas: list[dict], stat: str, plots: list[Path], out: Path) -> str:
    parts = ["# melo_fast benchmarks", "",
             "Generated by `python benchmarks/report.py` from pytest-benchmark JSON (`make bench`); do not edit by "
             "hand. Every comparison below was measured side by side in the same run; ratios are "
             f"`baseline time / row time` (> 1 = faster than the baseline) from the **{stat}** of each row's rounds. "
             "Shapes, dtypes, backends and versions of every row are in its `extra_info` in the JSON.", "",
             "How the inputs are made is in `benchmarks/README.md`: databases and LoRA banks are written "
             "directly (random singleton clusters; the benchmark inputs' own keys among them, so every sample "
             "hits an edit), not trained; the `reference` backend runs 1–2 rounds and is left out where one call "
             "would take more than a few seconds (no row for it in those groups); end-to-end and forward-vs-edits "
             "rows also time the same model with melo_fast disabled right before each round "
             "(\"interleaved\" ratios: the median over rounds of baseline/row in the same round, immune to load drift "
             "between rows); editing memory is measured with "
             "`torch.profiler` and also counted analytically.", "",
             "## Environment", "", environment(rows, metas), ""]

    targets = []
    for make, missing in ((lookup_targets, f"Lookup at 10k keys: fastest CPU backend ≥ {TARGET_LOOKUP_RATIO:.0f}× "
                                            "`reference`"),
                          (linear_targets, "Lookup curve linear in C up to 1M keys without running out of memory"),
                          (layer_targets, "Layer vs PEFT"),
                          (e2e_targets, f"End to end: patched with 10k edits ≥ {TARGET_E2E}× unpatched throughput"),
                          (edit_targets, f"Editing: block-only ≥ {TARGET_EDIT}× faster than full-rank training, "
                                         "lower peak memory"),
                          (database_targets, "Database insert, save and load at 100k stored keys")):
        found = make(rows)
        targets += found or [Target(missing, "no results in the given JSON", None)]
    parts += ["## Targets", "", table(["target", "measured", "verdict"],
                                      [[t.title, t.measured, t.verdict] for t in targets]), ""]
    missed = [t for t in targets if t.met is False]
    if missed:
        parts += ["### Where a target is not met, and why", ""]
        parts += [f"- **{t.title}**: {t.why or 'see the tables below.'}" for t in missed]
        parts.append("")
    unmeasured = [t for t in targets if t.met is None]
    if unmeasured:
        parts += ["Not measured in this run: " + "; ".join(t.title for t in unmeasured) + ".", ""]

    if plots:
        parts += ["## Plots", ""]
        for plot in plots:
            path = plot.resolve()
            shown = path.relative_to(out.parent).as_posix() if path.is_relative_to(out.parent) else str(path)
            parts.append(f"![{plot.stem}]({shown})")
        parts.append("")

    groups = groups_of(rows)
    used = set()
    for title, belongs in SECTIONS:
        names = [g for g in groups if g not in used and belongs(g)]
        if not names:
            continue
        parts += [f"## {title}", ""]
        for name in names:
            used.add(name)
            parts += [f"### {name}", "", group_table(groups[name], stat), ""]
        if title.startswith("Layer"):
            parts += peft_adapter_note(rows)
    parts += lifelong.section()
    parts += edit_speed_report.section()
    parts += gpu_report.section()
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path, default=[ROOT / "benchmarks" / "results.json"])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "plots")
    parser.add_argument("--stat", choices=("min", "median", "mean"), default="min")
    args = parser.parse_args(argv)
    missing = [p for p in args.json if not p.exists()]
    if missing:
        parser.error(f"no such file: {', '.join(map(str, missing))} (run `make bench` first)")
    rows, metas = load(args.json, args.stat)
    if not rows:
        parser.error("no benchmark results in the given files")
    plots = make_plots(rows, args.plots)
    args.out.write_text(render(rows, metas, args.stat, plots, args.out.resolve()) + "\n")
    print(f"wrote {args.out} ({len(rows)} results) and {len(plots)} plots in {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
