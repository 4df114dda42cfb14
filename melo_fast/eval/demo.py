"""``python -m melo_fast demo``: edit a real pretrained model on real data, offline, in minutes.

The deployed model is all-MiniLM-L6-v2 (a pretrained BERT) with a linear answer head trained on
the frozen encoder (:mod:`melo_fast.eval.classifier`): every question of the edit set predicts its
original answer. MELO then changes each edited question's answer to ``target_new``, in sequential
batches, and the harness (:mod:`melo_fast.eval.harness`) measures ES, ERR, generality and
locality against the unedited model and a sequential plain-LoRA baseline.

Why this router, these targets, this key and this radius (EVALUATION.md has the figures, each
regenerated from the JSON report of the command it names; none is copied here):

- Router ``encoder.layer.5.attention.output.dense``, LoRA on the last layer's FFN
  (``encoder.layer.5.intermediate.dense`` and ``encoder.layer.5.output.dense``). MELO's generality
  depends on one geometric fact: a cluster's radius shrinks to half the distance to the nearest
  edit with another answer (the conflict split), so a paraphrase is only routed to its edit if it is
  closer to its question than half the distance between questions. zsRE questions are templates
  that differ in the subject, so early layers (a router in layer 3 ``output.dense`` → LoRA in
  layers 4-5) see "What species is ZIC3 specific to?" and "What species is ZIC2 specific to?" as
  near neighbours, while the last layer (where all-MiniLM-L6-v2 was trained to map paraphrases
  together) separates questions from each other more than from their paraphrases: EVALUATION.md
  ("How the demo's MELO configuration was chosen") compares the routers' key distances and best
  generality under the targets. Keys from the last layer leave only that layer's FFN to edit,
  which makes edits cheaper (backward through one FFN).
- Key position "last": the last real token, [SEP] for BERT, which attends to the whole question.
  Position -1 (what the MELO paper's released implementation uses) is a pad token for every row
  shorter than the longest of its batch, so a question's key depends on what it is batched with
  and the edit's own question can miss its edit; "mean" is the other candidate. The sweep in
  EVALUATION.md measures all three.
- ``init_radius`` "auto": melo_fast's scale-free default, ``relative_radius`` (0.1) x the model's
  key scale, the median distance between the keys of built-in neutral prompts, measured before the
  first edit (``melo_fast.editing.calibration``). Nothing in it is fitted to the edit data. The paper's radii
  belong to other models' key spaces. A number given with ``--init-radius`` is used as is.
- Optimizer: MELO's (Adam 1e-2, StepLR, 50 steps) with block scale 5 instead of MELO's 20 for
  zsRE; EVALUATION.md compares the two on the shipped set.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from melo_fast.config import MeloConfig
from melo_fast.eval import report as reporting
from melo_fast.eval.arguments import (
    add_common_arguments,
    apply_threads,
    config_overrides,
    load_or_exit,
    recorded_arguments,
)
from melo_fast.eval.classifier import build_deployed_model
from melo_fast.eval.harness import METHODS, SequentialEval, Settings
from melo_fast.eval.tasks import ClassifierTask

# The demo's MELO configuration for MiniLM (see the module docstring for why).
DEMO_CONFIG = MeloConfig(
    router="encoder.layer.5.attention.output.dense",
    targets=["encoder.layer.5.intermediate.dense", "encoder.layer.5.output.dense"],
    rank_per_block=4,
    init_radius="auto",
    key_position="last",
    edit_lr=1e-2,
    num_iter=50,
    scale=5.0,
)
# Printed at the end of every demo run so that users know what the full run costs.
DEV_RUN_NOTE = (
    "The full zsRE dev run (890 records, 712 edits in batches of 10, with the sweep and the LoRA baseline),\n"
    "  python -m melo_fast demo --data ../shared/data/zsre_knowedit_dev.json --sweep --threads 1\n"
    "takes tens of minutes on a 2-core CPU; EVALUATION.md gives its measured wall time."
)
SWEEP_KEY_POSITIONS = ("last", "mean", -1)
SWEEP_RADIUS_FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25)  # × median question-to-rephrase distance


def add_arguments(parser) -> None:
    """Arguments of ``python -m melo_fast demo``."""
    add_common_arguments(parser, batch_size_default=10)
    parser.set_defaults(init_radius="auto")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep init_radius x key position (last, mean, -1) and plot generality vs locality")
    parser.add_argument("--examples", type=int, default=5, help="before/after examples to print")
    parser.set_defaults(run=run)


def demo_config(args) -> MeloConfig:
    return DEMO_CONFIG.replace(**config_overrides(args))


def run(args) -> dict:
    """Build the deployed model, edit it with MELO (and the baselines), print and write the report.

    Writes ``<out>/demo_report.json`` first, then the plots (``demo_curves.png``, with ``--sweep``
    ``sweep.png``), which need matplotlib: without it they are skipped with a warning.
    """
    start_all = time.perf_counter()
    apply_threads(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    reporting.check_plotting("demo")
    torch.manual_seed(args.seed)
    records = load_or_exit(args.data, args.limit)
    config = demo_config(args)
    out = Path(args.out)
    data_name = args.data or "the shipped demo set (melo_fast/eval/data/demo_facts.json)"
    print(f"melo_fast demo: {len(records)} records from {data_name}")

    model, tokenizer, head = build_deployed_model(records, seed=args.seed)
    print(f"deployed model: all-MiniLM-L6-v2 + linear head over {len(model.answers)} answers, trained on "
          f"{head.examples} questions in {head.seconds:.1f} s (train accuracy {head.train_accuracy:.3f})")

    task = ClassifierTask(model, tokenizer, model.answers)
    settings = Settings(batch_size=args.batch_size, holdout=args.holdout, progress=not args.no_progress)
    harness = SequentialEval(task, records, settings)
    radius_note = f" ({config.relative_radius} x the key scale)" if config.init_radius == "auto" else ""
    print(f"MELO: router {config.router} (key '{config.key_position}'), LoRA on {', '.join(config.targets)}, "
          f"rank {config.rank_per_block}/batch, init_radius {config.init_radius!r}{radius_note}, "
          f"{config.num_iter} steps/batch")
    shape = harness.describe()
    print(f"editing {shape['edited']} questions in {shape['batches']} batches of {shape['batch_size']}; "
          f"{shape['held_out']} records held out (never edited) as locality probes")

    results = {"unedited": harness.run_unedited()}
    report: dict = {
        "command": "demo",
        "arguments": recorded_arguments(args),
        "provenance": reporting.provenance(),
        "data": str(args.data) if args.data else "demo_facts.json",
        "model": "all-MiniLM-L6-v2 + linear head (frozen encoder)",
        "head_training": head.__dict__,
        "seed": args.seed,
        **shape,
    }
    if "melo" in methods:
        torch.manual_seed(args.seed)
        results["melo"] = harness.run_melo(config, keep=True)
        measured = results["melo"].extra
        report["radius"] = {"setting": config.init_radius, "relative_radius": config.relative_radius,
                            "key_scale": measured["key_scale"], "init_radius": measured["init_radius"]}
        config = config.replace(init_radius=measured["init_radius"])  # what the run used (the sweep's main point)
        report["examples"] = examples(harness, getattr(args, "examples", 5))
        reporting.print_examples(report["examples"])
        report["key_scale"] = {str(p): harness.key_scale(p) for p in SWEEP_KEY_POSITIONS}
        scale = report["key_scale"][str(config.key_position)]
        print(f"\nkey distances (key '{config.key_position}', medians): question to its rephrase "
              f"{scale['question_to_rephrase']:.3f}, to the nearest other edited question "
              f"{scale['question_to_nearest_question']:.3f}, locality question to the nearest edited question "
              f"{scale['locality_to_nearest_question']:.3f}; init_radius {config.init_radius}")
        if getattr(args, "sweep", False):
            report["sweep"] = sweep(harness, config, report["key_scale"])
            locality = results["melo"].metrics["locality"]
            report["sweep_summary"] = sweep_summary(report["sweep"], locality)
            reporting.print_sweep_summary(report["sweep_summary"], locality)
        harness.release()
    if "lora" in methods:
        torch.manual_seed(args.seed)
        results["lora"] = harness.run_lora(config)
    results = {name: results[name].to_dict() for name in METHODS if name in results}

    print()
    print(reporting.format_table(results))
    if "melo" in results:
        db = results["melo"]["db"]
        print(f"database: {db['clusters']} clusters, {db['points']} points, {db['conflicts']} conflicts, "
              f"{db['forgotten_points']} forgotten points, {db['blocks']} blocks")
    for name, result in results.items():
        if name != "unedited":
            per_edit = result["edit_seconds"] / max(1, shape["edited"])
            print(f"{name}: edit time {result['edit_seconds']:.1f} s ({1000 * per_edit:.0f} ms per edit), "
                  f"evaluation {result['eval_seconds']:.1f} s")
    total = time.perf_counter() - start_all
    report.update(melo_config=config.to_dict(), methods=results, total_seconds=total)
    reporting.write_json(out / "demo_report.json", report)
    written = [out / "demo_report.json"]
    short_name = Path(args.data).name if args.data else "shipped demo set"
    written.append(reporting.save_plot(reporting.plot_curves, out / "demo_curves.png", results,
                                       f"MELO vs sequential LoRA on all-MiniLM-L6-v2 ({short_name})"))
    if "sweep" in report:
        written.append(reporting.save_plot(reporting.plot_sweep, out / "sweep.png", report["sweep"],
                                           (config.key_position, config.init_radius)))
    print(f"\nwrote {', '.join(str(path) for path in written if path is not None)}")
    print(f"total {total:.0f} s. {DEV_RUN_NOTE}")
    return report


def examples(harness: SequentialEval, count: int) -> list[dict]:
    """A few edited questions (and a paraphrase and a locality question each), before and after MELO."""
    editor = harness.editor
    answerer = harness.answerer
    picks = [round(i * (len(harness.edited) - 1) / max(1, count - 1)) for i in range(min(count, len(harness.edited)))]
    relation_owner = {}
    offset = 0
    for record in harness.edited:
        if record.locality:
            relation_owner[record.index] = offset
        offset += len(record.locality)
    rows = []
    for i in picks:
        record = harness.edited[i]
        row = {
            "question": record.prompt,
            "original": record.ground_truth[0],
            "target": record.target_new,
            "before": answerer.unedited["edit"][i],
            "after": answerer.routed("edit", editor, [i])[0],
            "rephrase": record.rephrase_prompt,
            "rephrase_before": answerer.unedited["rephrase"][i],
            "rephrase_after": answerer.routed("rephrase", editor, [i])[0],
        }
        if record.index in relation_owner:
            j = relation_owner[record.index]
            row.update(
                locality=harness.sets["locality_relation"].texts[j],
                locality_before=answerer.unedited["locality_relation"][j],
                locality_after=answerer.routed("locality_relation", editor, [j])[0],
            )
        rows.append(row)
    return rows


def sweep(harness: SequentialEval, config: MeloConfig, key_scale: dict) -> list[dict]:
    """init_radius × key position, replayed on the blocks trained by the main MELO run (exact)."""
    points = []
    grid = [(p, round(f * key_scale[str(p)]["question_to_rephrase"], 4)) for p in SWEEP_KEY_POSITIONS
            for f in SWEEP_RADIUS_FACTORS]
    grid.append((config.key_position, config.init_radius))
    from tqdm.auto import tqdm

    for position, radius in tqdm(grid, desc="sweep", unit="config", disable=not harness.settings.progress):
        result = harness.replay(position, radius)
        points.append({"key_position": position, "init_radius": radius, **result.metrics, "db": result.db})
    return points


def sweep_summary(points: list[dict], locality: float) -> list[dict]:
    """Per key position: the sweep point with the best rephrase generality among those whose
    locality is at least ``locality`` (the demo default's), i.e. generality at equal locality."""
    rows = []
    for position in SWEEP_KEY_POSITIONS:
        eligible = [p for p in points if p["key_position"] == position and p["locality"] >= locality]
        if eligible:
            best = max(eligible, key=lambda p: (p["generality_rephrase"], p["generality_generate"]))
            rows.append({key: best[key] for key in ("key_position", "init_radius", "es", "err", "generality_rephrase",
                                                    "generality_generate", "locality")})
        else:
            rows.append({"key_position": position, "init_radius": None})
    return rows


__all__ = ["DEMO_CONFIG", "add_arguments", "run", "sweep", "sweep_summary"]
