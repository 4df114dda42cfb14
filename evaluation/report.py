"""Generate EVALUATION.md and its plots from the committed JSON reports in ``evaluation/runs/``.

    python evaluation/report.py              # EVALUATION.md + the plots in docs/ (PLOTS)
    python evaluation/report.py --commands   # the commands that make every report read here

Every figure in EVALUATION.md is read from a report written by ``python -m melo_fast demo``
(``evaluation/runs/<run>/demo_report.json``, one per entry of :data:`RUNS`), and every sentence that
compares figures is worded from the figures themselves. A missing report renders as
"not yet run: <command>"; a report whose recorded arguments differ from its command renders as
"stale" with the differences. Neither ever shows a number. The plots are redrawn from the same
reports by the functions the demo uses (:mod:`melo_fast.eval.report`). The section on issue 22 is read from
``evaluation/generality/results/*.json`` by the tables of that folder's generator
(``evaluation/generality/tables.py``, imported here), which render a missing result as "not run".

The sections live in ``evaluation/report_sections/``, one module per subject (``__init__.py`` lists them);
this module draws the plots, puts the sections in order and writes the document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: import this checkout's melo_fast

# generality_report (patched by tests), TABLE_COLUMNS and present_columns are read from this module by tests.
from evaluation.generality import tables as generality_report  # noqa: E402, F401
from evaluation.report_sections.general import ci, commands, generality, intro, presets  # noqa: E402
from evaluation.report_sections.llm import llm_chat_choice, llm_results, llm_setup  # noqa: E402
from evaluation.report_sections.minilm import (  # noqa: E402
    data_notes,
    radius_and_optimizer,
    results,
    router_comparison,
    setup,
    sweep,
)
from evaluation.report_sections.runs import RUNS, Reports  # noqa: E402
from melo_fast.eval import report as plots  # noqa: E402
from melo_fast.eval.report import TABLE_COLUMNS, present_columns  # noqa: E402, F401

PLOTS = {"demo": "demo_curves.png", "dev": "dev_curves.png", "sweep": "dev_sweep.png",
         "smollm2_demo": "smollm2_demo_curves.png", "smollm2_dev": "smollm2_dev_curves.png"}
CURVES = {"demo": "all-MiniLM-L6-v2", "dev": "all-MiniLM-L6-v2", "smollm2_demo": "SmolLM2-135M-Instruct",
          "smollm2_dev": "SmolLM2-135M-Instruct"}  # run → model, for the titles


def make_plots(reports: Reports, plots_dir: Path) -> dict[str, Path]:
    """Redraw the plots of the present reports; delete those of missing ones (never a stale picture)."""
    wanted = {name: reports.has(name) for name in CURVES}
    wanted["sweep"] = reports.has("dev") and bool(reports["dev"].get("sweep"))
    for key, present in wanted.items():
        if not present:
            (plots_dir / PLOTS[key]).unlink(missing_ok=True)
    made: dict[str, Path] = {}
    for key, model in CURVES.items():
        if wanted[key]:
            data = reports[key]["data"]
            title = (f"MELO vs sequential LoRA on {model} ("
                     + ("shipped demo set" if data.endswith("facts.json") else Path(data).name) + ")")
            path = plots.save_plot(plots.plot_curves, plots_dir / PLOTS[key], reports[key]["methods"], title)
            if path is not None:
                made[key] = path
    if wanted["sweep"]:
        config = reports["dev"]["melo_config"]
        path = plots.save_plot(plots.plot_sweep, plots_dir / PLOTS["sweep"], reports["dev"]["sweep"],
                               (config["key_position"], config["init_radius"]), "all-MiniLM-L6-v2")
        if path is not None:
            made["sweep"] = path
    return made


def render(reports: Reports, plotted: dict[str, Path], out: Path) -> str:
    lines = intro() + commands(reports) + llm_setup() + llm_chat_choice(reports) + llm_results(reports, plotted, out)
    lines += setup(reports) + data_notes(reports) + results(reports, plotted, out)
    lines += sweep(reports, plotted, out) + router_comparison(reports) + radius_and_optimizer(reports)
    lines += generality() + presets() + ci()
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "evaluation" / "runs", help="folder of the run reports")
    parser.add_argument("--out", type=Path, default=ROOT / "EVALUATION.md")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs")
    parser.add_argument("--commands", action="store_true", help="print the command of every run and exit")
    args = parser.parse_args(argv)
    if args.commands:
        for run in RUNS.values():
            print(f"{run.command}   # {run.what}")
        print("python evaluation/report.py")
        return 0
    reports = Reports(args.runs)
    plotted = make_plots(reports, args.plots)
    args.out.write_text(render(reports, plotted, args.out))
    missing = [name for name in RUNS if not reports.has(name)]
    print(f"wrote {args.out} from {len(reports.data)} of {len(RUNS)} reports and {len(plotted)} plots"
          + (f"; not usable: {', '.join(f'{n} ({reports.problems[n]})' for n in missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
