"""The lifelong-scale part of ``BENCHMARKS.md``: the long sequential run and the bank's memory (issue 13).

Both come from scripts, not from pytest-benchmark, and write their own JSON beside this file:
``long_run.py`` → ``long_run.json``, ``bank_memory.py`` → ``bank_memory.json``. ``report.py`` calls
:func:`section` and :func:`plot`; a missing file gives the command that makes it, never a figure.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
LONG_RUN = HERE / "long_run.json"
BANK_MEMORY = HERE / "bank_memory.json"
FLAT_WINDOW = 100  # batches compared at the start and the end of the run


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _source(data: dict) -> str:
    source = data.get("source") or {}
    commit = str(source.get("commit") or "unknown")[:10]
    changed = source.get("changed") or []
    return f"commit {commit}" + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def long_run_lines(data: dict | None) -> list[str]:
    lines = ["### A long sequential run: 10,000 edits in batches of 10", ""]
    if data is None:
        return lines + ["*Not run: `python benchmarks/long_run.py` (about 40 minutes on one core).*", ""]
    summary, batches, checkpoints = data["summary"], data["batches"], data["checkpoints"]
    first, last = batches[:FLAT_WINDOW], batches[-FLAT_WINDOW:]
    seconds = [statistics.median(b["seconds"] for b in part) for part in (first, last)]
    inserts = [statistics.median(b["insert_seconds"] for b in part) for part in (first, last)]
    lines += [
        f"`python benchmarks/long_run.py` ({_source(summary)}; torch {summary.get('torch', '?')}, "
        f"{summary['threads']} thread): {summary['edits']:,} zsRE (question, target) pairs in "
        f"{summary['batches']:,} batches on a tiny random GPT-2 (4 layers, width 64), `num_iter` "
        f"{summary['num_iter']}, init_radius auto = {summary['init_radius']:.4g}. ES is the token accuracy of a "
        "batch's targets right after its edit; ERR the same over every edit so far. The module docstring of "
        "`long_run.py` defines each fate.", "",
        f"- **Seconds per edit batch**: median {seconds[0]:.3f} s over the first {FLAT_WINDOW} batches, "
        f"{seconds[1]:.3f} s over the last {FLAT_WINDOW} ({seconds[1] / seconds[0]:.2f}×), with "
        f"{batches[FLAT_WINDOW - 1]['keys_stored']:,} and {batches[-1]['keys_stored']:,} keys stored; of which the "
        f"database insert {inserts[0] * 1e3:.1f} ms and {inserts[1] * 1e3:.1f} ms.",
        f"- **ES** (mean over batches) {summary['mean_es']:.3f}; five steps on a random 64-wide model learn about a "
        "third of the target tokens. What the run tests is whether the edits, once made, stay: ERR against the "
        "ES of the same edits below.", "",
    ]
    fate_names = list(checkpoints[-1]["fates"])
    header = ["edits", "ERR", "ES of the same edits", "ERR / ES", *fate_names, "conflicts (total)", "elapsed"]
    rows = []
    for point in checkpoints:
        fates = point["fates"]
        es = point["es_of_the_same_edits"]
        rows.append([f"{point['edits']:,}", f"{point['err']:.3f}", f"{es:.3f}", f"{point['err'] / es:.3f}",
                     *(f"{fates.get(n, 0):,}" for n in fate_names), f"{point['db']['conflicts']:,}",
                     f"{point['elapsed_seconds']:.0f} s"])
    lines += _table(header, rows) + [""]
    end = checkpoints[-1]
    lost = {name: count for name, count in end["fates"].items() if name not in ("kept", "re-edited") and count}
    lines += [f"At {end['edits']:,} edits, {end['fates'].get('kept', 0):,} route to their own block and "
              f"{end['fates'].get('re-edited', 0):,} were re-edited by a later edit of the same question; the rest: "
              + (", ".join(f"{name} {count:,}" for name, count in lost.items()) or "none") + ".", ""]
    return lines


def bank_memory_lines(data: dict | None) -> list[str]:
    lines = ["### Memory per edit on a 7B-shaped model (bf16)", ""]
    if data is None:
        return lines + ["*Not run: `python benchmarks/bank_memory.py`.*", ""]
    rows = []
    for target in data["targets"]:
        per_fact = target["bytes_per_edited_fact"]
        rows.append([target["shape"], str(target["rank"]), f"{target['block_bytes_computed']:,} B",
                     f"{per_fact['batch of 10']:,.0f} B", f"{target['blocks_stored']:,}",
                     f"{target['peak_excess_in_chunks']:.2f} chunk of {target['chunk_bytes'] / 2**20:.0f} MiB"])
    lines += [f"`python benchmarks/bank_memory.py` ({_source(data)}; torch {data.get('torch', '?')}): one block per "
              "edit batch and target layer, grown in chunks; the peak is measured with `torch.profiler` while "
              "the bank grows past several chunks.", ""]
    lines += _table(["target layer", "rank", "bytes per edit batch", "per fact, batches of 10", "blocks appended",
                     "peak above the blocks' own bytes"], rows) + [""]
    database = data["database"]
    lines += [f"The database adds {database['bytes_per_key']:,} bytes per stored key at d = {database['dim']} "
              f"({database['bytes_per_key_with_buffer_room']:,} with its growable buffers' room).", ""]
    return lines


def section() -> list[str]:
    """Markdown lines of the lifelong-scale section, from the JSON files beside this module."""
    return (["## Lifelong scale: a long run and memory per edit", ""]
            + long_run_lines(_read(LONG_RUN)) + bank_memory_lines(_read(BANK_MEMORY)))


def plot(out_dir: Path) -> list[Path]:
    """``long_run.png``: seconds per batch and ES per batch over the run, ERR and ES at each checkpoint."""
    data = _read(LONG_RUN)
    if data is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches, checkpoints = data["batches"], data["checkpoints"]
    window = 50

    def rolling_median(values: list[float]) -> list[float]:
        return [statistics.median(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]

    edits = [b["edits"] for b in batches]
    fig, (ax_time, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_time.plot(edits, [b["seconds"] for b in batches], ",", alpha=0.4, label="one batch")
    ax_time.plot(edits, rolling_median([b["seconds"] for b in batches]), label=f"rolling median ({window} batches)")
    ax_time.plot(edits, rolling_median([b["insert_seconds"] for b in batches]), label="of which database insert")
    ax_time.set_xlabel("edits made")
    ax_time.set_ylabel("seconds per edit batch of 10")
    ax_time.set_ylim(bottom=0)
    ax_time.set_title("Seconds per edit batch vs edits made (wall clock)", fontsize=10)
    ax_time.legend(fontsize=8)
    points = [c["edits"] for c in checkpoints]
    ax_err.plot(points, [c["err"] for c in checkpoints], marker="o", label="ERR (every edit so far)")
    ax_err.plot(points, [c["es_of_the_same_edits"] for c in checkpoints], marker="s",
                label="ES of the same edits (right after each)")
    ax_err.set_xlabel("edits made")
    ax_err.set_ylim(0, 1)
    ax_err.set_title("ERR vs the ES of the same edits", fontsize=10)
    ax_err.legend(fontsize=8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "long_run.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
