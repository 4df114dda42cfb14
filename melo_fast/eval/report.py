"""Report formatting of the evaluation commands: console tables, the JSON report, PNG plots.

Nothing here runs a model. Every function takes the JSON form of the results (``methods``: method
name → :meth:`melo_fast.eval.harness.MethodResult.to_dict`; sweep points as the demo writes them),
so the same code prints a run, plots it, and redraws the plots of a saved report
(``evaluation/report.py`` builds EVALUATION.md from the saved reports).

Plots need matplotlib, an optional dependency: a command calls :func:`check_plotting` before its
long work and :func:`save_plot` after writing its JSON, so a missing matplotlib costs the plots
(one warning line) and never the results.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

# The generation-based metrics (GRACE/MELO protocol: the score of greedy answers).
TABLE_COLUMNS = (
    ("es", "ES"),
    ("err", "ERR"),
    ("generality_rephrase", "gen(rephrase)"),
    ("generality_generate", "gen(generate)"),
    ("locality", "locality"),
    ("locality_relation", "loc(relation)"),
    ("locality_unedited", "loc(not edited)"),
    ("portability", "portability"),
    ("target_repetition", "target repeats"),
)
# The teacher-forced token accuracies of EasyEdit-style tables (generative tasks).
FORCED_COLUMNS = (
    ("rewrite_acc_at_edit", "rewrite@edit"),
    ("rewrite_acc", "rewrite"),
    ("rephrase_acc", "rephrase"),
    ("locality_acc", "locality"),
    ("portability_acc", "portability"),
)


def present_columns(methods: dict[str, dict], columns=TABLE_COLUMNS) -> list[tuple[str, str]]:
    """The columns of ``columns`` that some method of ``methods`` (JSON form) has a value for."""
    return [(key, title) for key, title in columns if any(key in r["metrics"] for r in methods.values())]


def format_table(methods: dict[str, dict], columns=TABLE_COLUMNS, seconds: bool = True) -> str:
    """A plain-text method × metric table of ``methods`` (JSON form): the ``columns`` some method has,
    and edit seconds (``seconds``)."""
    shown = present_columns(methods, columns)
    header = f"{'method':<10}" + "".join(f"{title:>16}" for _, title in shown) + (f"{'edit s':>10}" if seconds else "")
    lines = [header, "-" * len(header)]
    for name, result in methods.items():
        cells = "".join(f"{result['metrics'].get(key, float('nan')):>16.3f}" for key, _ in shown)
        lines.append(f"{name:<10}{cells}" + (f"{result['edit_seconds']:>10.1f}" if seconds else ""))
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    """Write ``report`` (indented JSON; paths and tensors converted) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def provenance() -> dict:
    """Where and from which code a report was made: versions, machine, threads, git commit.

    ``git.changed`` lists the files of the package source (``melo_fast/``, ``csrc/``, ``setup.py``,
    ``pyproject.toml``) that differ from ``git.commit``: empty means the figures come from that commit
    exactly. Changes elsewhere (tests, docs, earlier reports) cannot change a figure, so they are not
    counted. ``git`` is None outside a git checkout.
    """
    import transformers

    import melo_fast

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "melo_fast": melo_fast.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(),
        "git": git_state(Path(melo_fast.__file__).resolve().parents[1]),
    }


SOURCE_PATHS = ("melo_fast", "csrc", "setup.py", "pyproject.toml")


def git_state(root: Path, paths: tuple[str, ...] = SOURCE_PATHS) -> dict | None:
    """``{"commit": HEAD, "changed": files under paths that differ from it}`` of the checkout at ``root``.

    Changed files are staged, unstaged and untracked ones (``git status --porcelain``), so an empty
    list means the figures made now come from ``commit`` exactly. None outside a git checkout.
    """
    def git(*args):
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return done.stdout if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", *paths)
    except (OSError, subprocess.SubprocessError):
        return None
    if not commit or status is None:
        return None
    return {"commit": commit.strip(), "changed": [line[3:] for line in status.splitlines() if line.strip()]}


def plotting_available() -> bool:
    """Whether matplotlib can be imported (plots are optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def check_plotting(command: str) -> None:
    """Before a command's long work: one warning line if its plots will be skipped."""
    if not plotting_available():
        print(f"melo_fast {command}: matplotlib is not installed: the JSON report will be written, the plots "
              "skipped (pip install matplotlib to get them)", file=sys.stderr)


def save_plot(plot: Callable[..., None], path: Path, *args) -> Path | None:
    """``plot(*args, path)``, or a one-line warning and None when matplotlib is missing.

    Call it after the JSON report is written: a plot is never worth the results.
    """
    if not plotting_available():
        print(f"melo_fast: skipped {path}: matplotlib is not installed", file=sys.stderr)
        return None
    plot(*args, path)
    return path


def plot_curves(methods: dict[str, dict], title: str, path: Path) -> None:
    """PNG of ES/ERR/generality/locality against the number of edits, one line per method (JSON form)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("es", "ES (right after its batch)"), ("err", "ERR (edits so far)"),
            ("generality_rephrase", "generality (rephrase)"), ("locality", "locality"))
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), sharex=True)
    styles = {"melo": ("tab:blue", "-o"), "lora": ("tab:red", "--s")}
    for axis, (key, label) in zip(axes, keys, strict=True):
        for name, result in methods.items():
            curve = result.get("curve") or []
            if not curve:
                continue
            color, style = styles.get(name, ("tab:gray", "-"))
            xs = [p["edits"] for p in curve]
            axis.plot(xs, [p[key] for p in curve], style, color=color, label=name, markersize=4)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("edits so far")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower left")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_generations(rows: list[dict]) -> None:
    """The demo's before/after generations (:func:`melo_fast.eval.demo.generation_examples`)."""
    print("\nBefore/after MELO: greedy continuations (the edited prompt, a paraphrase, another question about "
          "the same subject):")
    for row in rows:
        print(f"\n  edit: {row['original']} -> {row['target']}")
        for kind in ("edit", "paraphrase", "same subject"):
            if kind not in row:
                continue
            probe = row[kind]
            print(f"  [{kind}] {probe['prompt']}")
            print(f"      before: {probe['before']!r}")
            print(f"      after:  {probe['after']!r}")


def print_examples(rows: list[dict]) -> None:
    """The demo's before/after rows (:func:`melo_fast.eval.demo.examples`) as a console table."""
    print("\nBefore/after MELO (✓ = the edit's target for edited questions and paraphrases, "
          "the unedited answer for locality questions):")
    print(f"  {'question':<58} {'before':<22} {'after':<22} {'wanted':<22}")
    for row in rows:
        mark = "✓" if row["after"] == row["target"] else "✗"
        print(f"  {_cut(row['question'], 58):<58} {_cut(row['before'], 22):<22} "
              f"{_cut(row['after'], 20) + ' ' + mark:<22} {_cut(row['target'], 22):<22}")
        mark = "✓" if row["rephrase_after"] == row["target"] else "✗"
        print(f"    paraphrase: {_cut(row['rephrase'], 46):<46} {_cut(row['rephrase_before'], 22):<22} "
              f"{_cut(row['rephrase_after'], 20) + ' ' + mark:<22} {_cut(row['target'], 22):<22}")
        if "locality" in row:
            mark = "✓" if row["locality_after"] == row["locality_before"] else "✗"
            print(f"    locality:   {_cut(row['locality'], 46):<46} {_cut(row['locality_before'], 22):<22} "
                  f"{_cut(row['locality_after'], 20) + ' ' + mark:<22} {_cut(row['locality_before'], 22):<22}")


def print_sweep_summary(rows: list[dict], locality: float) -> None:
    """The best sweep point per key position (:func:`melo_fast.eval.demo.sweep_summary`)."""
    print(f"\nSweep: best generality per key position at locality >= {locality:.3f} (the default's):")
    print(f"  {'key position':<14}{'init_radius':>12}{'ES':>8}{'ERR':>8}{'gen(reph)':>11}{'gen(gen)':>10}{'loc':>8}")
    for row in rows:
        if row["init_radius"] is None:
            print(f"  {str(row['key_position']):<14}{'none reaches this locality':>40}")
            continue
        print(f"  {str(row['key_position']):<14}{row['init_radius']:>12.4g}{row['es']:>8.3f}{row['err']:>8.3f}"
              f"{row['generality_rephrase']:>11.3f}{row['generality_generate']:>10.3f}{row['locality']:>8.3f}")


KEY_POSITION_NAMES = {"last": "last real token (melo_fast default)", "mean": "mean over real tokens",
                      -1: "position -1 (MELO's released implementation)"}


def plot_sweep(points: list[dict], chosen: tuple | None, model_name: str, path: Path) -> None:
    """Generality (rephrase, generate) and ERR against locality, one line per key position.

    ``points``: the demo's sweep (``key_position``, ``init_radius`` and the metrics per point);
    ``chosen``: the run's own ``(key_position, init_radius)``, marked with a star (None: no star);
    ``model_name``: for the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    positions = list(dict.fromkeys(p["key_position"] for p in points))
    for axis, metric in zip(axes, ("generality_rephrase", "generality_generate", "err"), strict=True):
        for position in positions:
            line = sorted((p for p in points if p["key_position"] == position), key=lambda p: p["init_radius"])
            xs = [p["locality"] for p in line]
            ys = [p[metric] for p in line]
            axis.plot(xs, ys, "-o", markersize=4, label=KEY_POSITION_NAMES.get(position, str(position)))
            for p in line[::2]:  # every other radius, so that the labels stay readable
                axis.annotate(f"{p['init_radius']:.2f}", (p["locality"], p[metric]), fontsize=6,
                              textcoords="offset points", xytext=(3, 3))
        star = [p for p in points if chosen is not None and (p["key_position"], p["init_radius"]) == tuple(chosen)]
        if star:
            axis.plot([star[0]["locality"]], [star[0][metric]], "k*", markersize=12, label="demo default")
        axis.axvline(0.98, color="gray", linestyle=":", linewidth=1)  # the locality target
        axis.set_xlabel("locality (dotted: 0.98 target)")
        axis.set_ylabel(metric.replace("_", " "))
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"MELO on {model_name}: generality and ERR vs locality; labels: init_radius", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
