"""The plots of ``BENCHMARKS.md`` (``benchmarks/plots/``), drawn from the rows; ``db_scaling.png`` and the
lifelong plots come from ``plot_db_scaling.py`` and ``lifelong_report.py``."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from benchmarks import lifelong_report as lifelong
from benchmarks.report_rows import LINEAR_CASE, Row, baseline_of, curve, groups_of
from benchmarks.report_targets import TARGET_E2E


def make_plots(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    lookup = curve(rows, "lookup_vs_keys")
    if lookup:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for name, points in lookup.items():
            style = "--" if name.startswith("reference") else "-"
            ax.plot([x for x, _ in points], [r.time * 1e3 for _, r in points], style, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("stored keys C (singleton clusters, d = 768)")
        ax.set_ylabel("lookup time (ms, log)")
        ax.set_title("vecdb_search: time vs number of stored keys")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "lookup_vs_keys.png")

    forward = curve(rows, "forward_vs_edits")
    if forward:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        unpatched = [r for r in rows if r.get("plot") == "forward_vs_edits" and r.get("x") is None]
        for name, points in forward.items():
            points = [(x, r) for x, r in points if x > 0]
            ax.plot([x for x, _ in points], [r.time * 1e3 for _, r in points], marker="o", label=f"patched, {name}")
        for row in unpatched:
            ax.axhline(row.time * 1e3, color="black", linestyle="--", label="unpatched")
        ax.set_xscale("log")
        ax.set_xlabel("edits (keys) in the database")
        ax.set_ylabel("forward time per batch (ms)")
        ax.set_ylim(bottom=0)
        group = next(iter(forward.values()))[0][1].group
        ax.set_title(group.split(" fp32")[0].replace("forward vs edits", "Forward time vs edits:"), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "forward_vs_edits.png")

    layer = [r for r in rows if r.get("op") == "layer"]
    if layer:
        panels = list(OrderedDict.fromkeys(r.group for r in layer))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, group in zip(axes[0], panels, strict=True):
            members = sorted([r for r in layer if r.group == group], key=lambda r: r.time)
            colors = ["tab:blue" if r.case.startswith("melo_fast") else "tab:gray" if r.case == LINEAR_CASE
                      else "tab:orange" for r in members]
            bars = ax.barh([r.case for r in members], [r.time * 1e3 for r in members], color=colors)
            ax.bar_label(bars, fmt="%.0f ms", fontsize=7)
            ax.set_xlabel("time per forward (ms)")
            ax.set_title(group.split(": ")[-1], fontsize=9)
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=8)
        fig.suptitle("One target layer, 64x128 tokens, 768->3072, k=4", fontsize=10)
        save(fig, "layer.png")

    e2e = [r for r in rows if r.get("plot") in ("e2e_forward", "e2e_generate")]
    if e2e:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels, values = [], []
        for members in groups_of(e2e).values():
            base = baseline_of(members)
            for row in members:
                if row is base or (base is None and row.paired_ratio is None):
                    continue
                kind = "fwd" if row.get("plot") == "e2e_forward" else "gen"
                labels.append(f"{row.get('model')} {kind}\n{row.get('edits'):,} edits")
                values.append(row.paired_ratio if row.paired_ratio is not None else base.time / row.time)
        bars = ax.bar(range(len(values)), values,
                      color=["tab:green" if v >= TARGET_E2E else "tab:red" for v in values])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(TARGET_E2E, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {TARGET_E2E}")
        ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=60, ha="right")
        ax.set_ylabel("speed relative to unpatched\n(interleaved pairs)")
        ax.set_ylim(0, max([1.2, *values]) * 1.05)
        ax.set_title("End to end: patched / unpatched throughput (higher is better)")
        ax.legend(fontsize=8)
        save(fig, "e2e.png")

    edit = [r for r in rows if r.get("plot") == "edit"]
    if edit:
        settings = list(OrderedDict.fromkeys(r.get("setting") for r in edit))
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        width = 0.38
        for i, path in enumerate(("block-only", "reference")):
            members = [next((r for r in edit if r.get("setting") == s and (r.backend == "reference") == (i == 1)), None)
                       for s in settings]
            xs = [j + (i - 0.5) * width for j in range(len(settings))]
            bars = ax_t.bar(xs, [r.time if r else 0 for r in members], width, label=path)
            ax_t.bar_label(bars, fmt="%.1f s", fontsize=8)
            bars = ax_m.bar(xs, [(r.get("peak_tensor_bytes") or 0) / 2**20 if r else 0 for r in members], width,
                            label=f"{path} (measured, torch.profiler)")
            ax_m.bar_label(bars, fmt="%.0f MiB", fontsize=8)
            ax_m.scatter(xs, [(r.get("train_state_bytes") or 0) / 2**20 if r else 0 for r in members], color="black",
                         marker="_", s=400, zorder=3, label="analytic train state" if i == 0 else None)
        for ax, ylabel in ((ax_t, "seconds per edit batch"), (ax_m, "peak tensor memory during the edit (MiB)")):
            ax.set_xticks(range(len(settings)), settings, fontsize=8)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        fig.suptitle("Editing one batch: block-only vs full-rank (reference) training", fontsize=10)
        save(fig, "edit.png")

    from benchmarks.plot_db_scaling import plot_db_scaling

    written += plot_db_scaling(rows, out_dir)
    written += lifelong.plot(out_dir)
    return written
