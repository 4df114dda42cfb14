"""``python -m melo_fast eval``: the protocol (all methods) on a local model: a Hugging Face folder or
a GGUF file.

Without ``--model`` it runs the demo (:mod:`melo_fast.eval.demo`) with the demo's defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from melo_fast.config import MeloConfig
from melo_fast.eval import demo, report
from melo_fast.eval.arguments import (
    PRESETS,
    add_common_arguments,
    apply_threads,
    config_overrides,
    key_projection,
    load_or_exit,
    preset,
    recorded_arguments,
    with_projection,
)
from melo_fast.eval.harness import SequentialEval, Settings
from melo_fast.eval.local_model import load_local_model
from melo_fast.eval.tasks import task_for


def add_arguments(parser) -> None:
    """Arguments of ``python -m melo_fast eval``."""
    parser.add_argument("--task", default="zsre", choices=["zsre"], help="task (KnowEdit zsRE question answering)")
    parser.add_argument("--model", default=None,
                        help="local model: a Hugging Face folder (seq2seq, causal LM or sequence classifier) or a "
                             ".gguf file (tokenizer from the same file); default: the demo's model")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="the paper's configuration (router, targets, blocks x rank, batch size, radius, lr)")
    add_common_arguments(parser, batch_size_default=None)
    parser.set_defaults(run=run_eval)


def run_eval(args) -> dict:
    """``python -m melo_fast eval``: all methods on a local model (or the demo's model).

    Writes ``<out>/eval_report.json`` (always first) and ``<out>/eval_curves.png`` (needs matplotlib).
    """
    if args.model is None:  # the demo's model, with the demo's defaults
        if args.preset:
            raise SystemExit(f"--preset {args.preset} configures a paper checkpoint: give its folder with --model")
        return demo.run(argparse.Namespace(**{**vars(args), "model": demo.DEFAULT_MODEL}))
    apply_threads(args)
    report.check_plotting("eval")
    torch.manual_seed(args.seed)
    records = load_or_exit(args.data, args.limit)
    config, batch_size = preset(args.preset) if args.preset else (MeloConfig(), 10)
    projection = key_projection(args)
    config = with_projection(config.replace(**config_overrides(args)), args, projection)
    try:
        model, tokenizer = load_local_model(args.model)
    except (FileNotFoundError, ImportError) as err:
        raise SystemExit(f"melo_fast eval: {err}") from None
    try:
        task = task_for(model, tokenizer, chat=bool(args.chat))
    except ValueError as err:
        raise SystemExit(f"melo_fast eval: --chat: {err}") from None
    settings = Settings(batch_size=args.batch_size or batch_size, holdout=args.holdout,
                        progress=not args.no_progress)
    harness = SequentialEval(task, records, settings)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"melo_fast eval: {args.model} ({task.kind}), {harness.describe()}, init_radius {config.init_radius!r}")
    runs = harness.run(config, methods, key_projection=projection)
    results = {name: result.to_dict() for name, result in runs.items()}
    print(report.format_table(results))
    if task.kind != "classifier":
        print("teacher-forced token accuracies:")
        print(report.format_table(results, report.FORCED_COLUMNS, seconds=False))
    out = Path(args.out)
    summary = {
        "command": "eval",
        "arguments": recorded_arguments(args),
        "provenance": report.provenance(),
        "model": args.model,
        "task": task.kind,
        "prompting": "chat" if args.chat else "raw",
        "primary_score": task.primary,
        "data": args.data or "demo_facts.json",
        **harness.describe(),
        "melo_config": config.to_dict(),
        "methods": results,
    }
    report.write_json(out / "eval_report.json", summary)
    plot = report.save_plot(report.plot_curves, out / "eval_curves.png", results,
                            f"{Path(args.model).name}: metrics vs number of edits")
    print(f"wrote {out / 'eval_report.json'}" + (f" and {plot}" if plot else ""))
    return summary
