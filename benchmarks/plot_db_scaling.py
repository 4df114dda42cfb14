"""Plot ``db_scaling.png``: the vector database's costs against the number of stored keys (issue 13).

    python benchmarks/plot_db_scaling.py [results.json ...] [--plots benchmarks/plots]

Left: time of one insert of a batch of 100 keys (``test_bench_scaling.py::test_insert_scaling``), of a
lookup of 1 and 32 queries (the default backend's ``lookup_vs_keys`` rows), of the search of the same
100 keys each insert round was paired with, and of save and load (with ``torch.save``/``torch.load``
of the same tensors, interleaved, dotted). Right: insert time / search time of the same keys (median
of the per-round ratios), against the issue's target of 3x. ``report.py`` draws it from
``make_plots`` (``report_plots.py``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def _report():
    try:
        from benchmarks import report
    except ImportError:  # run from benchmarks/ (as report.py is)
        import report
    return report


def _paired_time(row) -> float:
    """The interleaved baseline's time, by the same statistic as the row's own (min, else median)."""
    paired = row.get("paired")
    return paired["min"] if row.stat == "min" else paired["median"]


def plot_db_scaling(rows, out_dir: Path) -> list[Path]:
    """Draw ``db_scaling.png`` in ``out_dir`` from report rows; nothing (``[]``) when the rows have no insert."""
    curve, target = _report().curve, _report().TARGET_INSERT_OVER_SEARCH
    scaling = curve(rows, "db_scaling")
    inserts = {name: points for name, points in scaling.items() if name.startswith("insert")}
    if not inserts:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(13, 5))
    first = next(iter(inserts.values()))[0][1]
    backend = first.get("backend")
    for name, points in scaling.items():
        ax_time.plot([x for x, _ in points], [r.time for _, r in points], marker="o", label=name)
        baseline = [(x, r) for x, r in points if (r.get("paired") or {}).get("median") is not None]
        if baseline and not name.startswith("insert"):
            paired = baseline[0][1].get("paired")["case"]
            ax_time.plot([x for x, _ in baseline], [_paired_time(r) for _, r in baseline], ":", marker=".",
                         label=f"{paired} (interleaved)")
    searched = [(x, _paired_time(r)) for x, r in inserts[next(iter(inserts))] if r.get("paired")]
    if searched:
        ax_time.plot([x for x, _ in searched], [t for _, t in searched], "--", marker="s",
                     label=f"search of the same 100 keys ({backend}, interleaved)")
    for name, points in curve(rows, "lookup_vs_keys").items():
        if name.startswith(f"{backend}, "):
            ax_time.plot([x for x, _ in points], [r.time for _, r in points], "-.", marker="^",
                         label=f"lookup, {name}")
    ax_time.set_xscale("log")
    ax_time.set_yscale("log")
    ax_time.set_xlabel("stored keys (d = 768)")
    ax_time.set_ylabel("seconds (log)")
    ax_time.set_title("Database at scale: time vs stored keys", fontsize=10)
    ax_time.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7)

    for name, points in inserts.items():
        ratios = [(x, statistics.median([1 / r for r in row.pair_ratios])) for x, row in points if row.pair_ratios]
        ax_ratio.plot([x for x, _ in ratios], [v for _, v in ratios], marker="o", label=name)
    ax_ratio.axhline(target, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {target:g}x")
    ax_ratio.set_xscale("log")
    ax_ratio.set_ylim(bottom=0)
    ax_ratio.set_xlabel("stored keys (d = 768)")
    ax_ratio.set_ylabel("insert time / search time of the same keys\n(median over interleaved rounds)")
    ax_ratio.set_title("Insert of 100 keys relative to searching them", fontsize=10)
    ax_ratio.grid(True, which="both", alpha=0.3)
    ax_ratio.legend(fontsize=8)
    threads = sorted({r.get("threads") for points in scaling.values() for _, r in points if r.get("threads")})
    timer = sorted({str((r.raw.get("options") or {}).get("timer")) for points in scaling.values() for _, r in points})
    fig.suptitle(f"{first.get('device')}; torch threads {threads}; timer {', '.join(timer)}", fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "db_scaling.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    report = _report()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", type=Path, default=[report.ROOT / "benchmarks" / "results.json"])
    parser.add_argument("--plots", type=Path, default=report.ROOT / "benchmarks" / "plots")
    parser.add_argument("--stat", default="min", choices=["min", "median", "mean"])
    args = parser.parse_args(argv)
    rows, _ = report.load(args.json, args.stat)
    written = plot_db_scaling(rows, args.plots)
    print(f"wrote {', '.join(map(str, written)) or 'nothing (no insert rows in the JSON)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
