"""Write ``evaluation/generality/REPORT.md`` from the committed JSON results in ``results/``.

    python evaluation/generality/report.py

Every figure in the report is read from a JSON written by one of the scripts of this folder (the JSON
records its own command); the prose between the tables lives in ``REPORT_TEMPLATE.md`` and takes its
figures from the same JSON through ``{placeholders}`` filled here. A missing JSON renders as "not run".

``evaluation/report.py`` imports this module for EVALUATION.md's section on issue 22: :func:`summary_lines`,
:func:`default_router_table`, :func:`paraphrase_table` (restricted to :data:`PROJECTIONS`), :func:`e2e_table`
with :data:`E2E_VIEWS`, and the notes :data:`GENERALITY_NOTE`, :data:`PROBE_CELLS` and :data:`E2E_NOTE`.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FLOORS = ("locality>=0.99", "locality>=0.98", "locality_clean>=0.99", "locality_clean>=0.98")
FLOOR_NAMES = {"locality>=0.99": "raw ≥ 0.99", "locality>=0.98": "raw ≥ 0.98",
               "locality_clean>=0.99": "clean ≥ 0.99", "locality_clean>=0.98": "clean ≥ 0.98"}
RAW98, CLEAN99 = "locality>=0.98", "locality_clean>=0.99"
MODELS = ("minilm", "smollm2")
# The routers MELO uses as shipped, in the probe's notation `<module>@<layer>:<position>/<metric>`: the MiniLM
# demo's (`encoder.layer.5.attention.output.dense`, last token) and MeloConfig()'s default for SmolLM2
# (`model.layers.19.mlp.up_proj`, last token), both with MELO's Euclidean distance; and the result file each is in.
DEFAULT_ROUTERS = {"minilm": ("probe_minilm_paraphrases", "attn@5:last/l2"),
                   "smollm2": ("probe_smollm2_paraphrases", "up@19:last/l2")}
# The projection the prose quotes per model (the key function chosen by the validation loss on A_val, section 2b).
PROJECTIONS = {"minilm": ("projection_minilm", "attn@5:last/cos"),
               "smollm2": ("projection_smollm2_up_3_mean", "up@3:mean/cos")}
# The end-to-end views: the floor whose part-A radius is read (None: the run's own radius), a tag, a title.
E2E_VIEWS = ((None, "main", "main run (the library's default radius for `melo`, A's raw ≥ 0.99 radius otherwise)"),
             (RAW98, "raw98", "at A's radius for raw locality ≥ 0.98"),
             (CLEAN99, "clean99", "at A's radius for clean locality ≥ 0.99"))

GENERALITY_NOTE = """\
Held-out generality is given as `generate / rephrase`: the held-out `generate_prompt` paraphrases (about 7 per
edit, never given) and `rephrase_prompt`. All figures are on part B, with every radius chosen on part A."""
PROBE_CELLS = """\
Cells: `generate / rephrase` generality on B at A's radius, B's locality there in parentheses (raw for the raw
floors, clean for the clean floors); after the semicolon, the best generate generality on B with the radius
fitted on B itself (a ceiling). "NN own": share of B's held-out generate prompts whose nearest stored key is
their own edit's (no radius rule can beat the ordering of the space)."""
E2E_NOTE = """\
Each variant is trained once; its routing is then replayed on the probe's radius grid (the blocks do not
depend on the radius), and the tables read the grid at part A's radius for the floor named. "routed own": share
of held-out generate prompts routed to their edit's block; "gen if routed": generality among those; "oracle gen":
generality when every paraphrase is routed to its own block; edit CPU seconds are one thread's process time per
edit."""


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def f3(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def f2(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- probe ---------------------------------------------------------------------------------------------
def at_a(result: dict, floor: str) -> dict | None:
    return result["B"]["summary"][floor].get("at_A_radius")


def probe_cells(result: dict) -> list[str]:
    """Per floor: generate / rephrase generality on B at part A's radius, with B's locality there (raw for raw
    floors, clean for clean ones), and the best generate generality on B itself (radius fitted on B); then the
    misroute rate at raw >= 0.98."""
    cells = []
    for floor in FLOORS:
        point, best = at_a(result, floor), result["B"]["summary"][floor]["best"]
        locality = floor.split(">=")[0]
        at = "–" if point is None else f"{f2(point['generate'])} / {f2(point['rephrase'])} ({f3(point[locality])})"
        cells.append(f"{at}; {f2(best and best['generate'])}")
    point = at_a(result, "locality>=0.98")
    cells.append("–" if point is None else f2(point["generate_misroute"]))
    return cells


PROBE_HEADER = ["key function", "edit paraphrases", "NN own (B)", *(FLOOR_NAMES[f] for f in FLOORS),
                "misroute (raw ≥ 0.98)"]


def probe_row(result: dict) -> list[str]:
    name = f"`{result['key_function']}`" + (" (radius on A_val)" if result.get("fit_part") == "A_val" else "")
    return [name, str(result["paraphrases"]), f2(result["B"]["nn_generate"]), *probe_cells(result)]


def key_screen(model: str, top: int = 6) -> str:
    """The default router and the best key functions of a model (by B@A generate at clean >= 0.99)."""
    screen = load(f"probe_{model}_keys")
    paraphrases = load(f"probe_{model}_paraphrases")
    if screen is None:
        return f"(not run: `probe_{model}_keys.json` is missing)"
    results = screen["results"]

    def score(r):
        point = at_a(r, "locality_clean>=0.99")
        return -1 if point is None else point["generate"]

    picked = [r for r in (paraphrases or {}).get("results", []) if r["paraphrases"] == 0]
    picked += sorted(results, key=score, reverse=True)[:top]
    picked.append(max((r for r in results if r["spec"].endswith(":last")), key=score))
    rows, seen = [], set()
    for r in picked:
        if r["key_function"] not in seen:
            seen.add(r["key_function"])
            rows.append(probe_row(r))
    return table(PROBE_HEADER, rows)


def screen_stats(model: str) -> dict:
    screen = load(f"probe_{model}_keys")
    if screen is None:
        return {}
    values = {}
    for floor in FLOORS:
        points = [at_a(r, floor) for r in screen["results"]]
        values[floor] = max(p["generate"] for p in points if p)
        values[floor + "_reph"] = max(p["rephrase"] for p in points if p)
    return {"functions": len(screen["results"]), **values, "seconds": screen["total_seconds"],
            "extraction": screen["key_extraction"]}


def not_run_row(model: str, name: str, key_function: str | None = None) -> list[str]:
    what = f"`{name}.json` is missing" if key_function is None else f"no `{key_function}` in `{name}.json`"
    return [model, f"(not run: {what})", *["–"] * (len(PROBE_HEADER) - 1)]


def paraphrase_table(projections: dict[str, tuple[str, str]] | None = None) -> str:
    """Routing bound with 0, 1 or 3 user paraphrases per edit, without and with a trained projection: the
    default router's rows of ``probe_<model>_paraphrases``, then every row of the model's projection results
    (all of them, or only the file named in ``projections[model]``, e.g. :data:`PROJECTIONS`)."""
    rows = []
    for model in MODELS:
        name = f"probe_{model}_paraphrases"
        data = load(name)
        rows += [[model, *probe_row(r)] for r in data["results"] if r["metric"] == "l2"] if data else [
            not_run_row(model, name)]
        names = projection_names(model) if projections is None else [projections[model][0]]
        for name in names:
            data = load(name)
            rows += [[model, *probe_row(r)] for r in data["results"]] if data else [not_run_row(model, name)]
    return table(["model", *PROBE_HEADER], rows)


def default_router_table() -> str:
    """Routing bound of the shipped routers (:data:`DEFAULT_ROUTERS`; no paraphrases, no projection)."""
    rows = []
    for model, (name, key_function) in DEFAULT_ROUTERS.items():
        result = default_router(model)
        rows.append([model, *probe_row(result)] if result else not_run_row(model, name, key_function))
    return table(["model", *PROBE_HEADER], rows)


def projection_names(model: str) -> list[str]:
    return sorted(p.stem for p in RESULTS.glob(f"projection_{model}*.json"))


def projection_table() -> str:
    rows = []
    for model in ("minilm", "smollm2"):
        for name in projection_names(model):
            data = load(name)
            t = data["training"]
            proj = [r for r in data["results"] if r["projection"] and r["paraphrases"] == 0]
            plain = [r for r in data["results"] if not r["projection"] and r["paraphrases"] == 0]
            cells = []
            for floor in ("locality>=0.98", "locality_clean>=0.99"):
                a, b = (at_a(x[0], floor) if x else None for x in (plain, proj))
                cells.append(f"{f2(a and a['generate'])} → {f2(b and b['generate'])}")
            best_val = min(entry["val_loss"] for entry in t["log"])
            rows.append([model, f"`{t['spec']}`", str(t["rank"]), f"{t['weight_decay']:g}", str(t["train_facts"]),
                         str(t["train_texts"]), str(t["train_hard_negatives"]), str(t["best_step"]),
                         f"{best_val:.3f}", f"{t['train_seconds']:.0f}", *cells])
    return table(["model", "key function", "rank", "weight decay", "facts", "texts", "hard negatives", "best step",
                  "val loss", "train s", "gen raw ≥ 0.98 (B@A)", "gen clean ≥ 0.99 (B@A)"], rows)


# --- end to end ----------------------------------------------------------------------------------------
E2E_HEADER = ["variant", "radius (× key scale)", "ES", "ERR", "gen rephrase", "gen generate", "routed own",
              "misrouted", "gen if routed", "oracle gen", "loc relation", "loc never-edited", "locality",
              "locality clean", "edit CPU s / edit"]


def grid_point(v: dict, floor: str) -> dict | None:
    """The replayed grid point at the radius the probe chose on part A for ``floor`` (None if not replayed)."""
    radius = v.get("part_A_radius", {}).get(floor)
    if radius is None:
        return None
    return next((p for p in v["grid"] if abs(p["relative_radius"] - radius) < 1e-6), None)


def e2e_variants(model: str) -> dict:
    """Every variant of the e2e JSONs of a model (``e2e_<model>*.json``), in file then run order."""
    variants = {}
    for path in sorted(RESULTS.glob(f"e2e_{model}*.json")):
        variants.update(json.loads(path.read_text())["variants"])
    return variants


def e2e_not_run(model: str) -> list[str]:
    """Variants an ``e2e_<model>*.json``'s recorded command asks for (``--variants``) that the file does not hold."""
    missing = []
    for path in sorted(RESULTS.glob(f"e2e_{model}*.json")):
        data = json.loads(path.read_text())
        argv = shlex.split(data.get("command", ""))
        if "--variants" in argv[:-1]:
            missing += [v for v in argv[argv.index("--variants") + 1].split(",") if v not in data["variants"]]
    return missing


def e2e_row(name: str, v: dict, floor: str | None) -> list[str]:
    r = v if floor is None else grid_point(v, floor)
    if r is None:
        return [name, "–"] + ["–"] * (len(E2E_HEADER) - 2)
    per_edit = v["edit_cpu_seconds"] / max(1, v["edits"])
    return [name, f"{r['relative_radius']:.3f}", f3(v["es"]) if floor is None else "", f3(r["err"]),
            f3(r["gen_rephrase"]), f3(r["gen_generate"]), f3(r["generate_routed_own"]), f3(r["generate_misrouted"]),
            f3(r["gen_generate_given_routed"]), f3(v["oracle_routing"]["gen_generate"]), f3(r["loc_relation"]),
            f3(r["loc_unedited"]), f3(r["locality"]), f3(r["locality_clean"]), f"{per_edit:.2f}"]


def e2e_table(model: str, floor: str | None) -> str:
    variants = e2e_variants(model)
    if not variants:
        return f"(not run: no `e2e_{model}*.json`)"
    return table(E2E_HEADER, [e2e_row(name, v, floor) for name, v in variants.items()])


def e2e_shape(model: str) -> str:
    data = load(f"e2e_{model}")
    if data is None:
        return "not run"
    s = data["shape"]
    q = s["probe_questions"]
    return (f"{s['records']} part-B records ({s['edited']} edited in {s['batches']} batches of 10, "
            f"{s['held_out']} never edited); probes: {q['rephrase']} rephrase, {q['generate']} held-out generate, "
            f"{q['locality_relation']} relation and {q['locality_unedited']} never-edited locality questions, of "
            f"which {s['same_fact']['locality_relation']} and {s['same_fact']['locality_unedited']} ask an edited fact")


# --- commands ------------------------------------------------------------------------------------------
def commands() -> str:
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        seconds = data.get("total_seconds", data.get("seconds"))
        prov = data.get("provenance", {})
        clean = {True: "clean", False: "uncommitted changes", None: "?"}[prov.get("source_clean")]
        rows.append([f"`{path.name}`", f"`{data.get('command', '?')}`", "–" if seconds is None else f"{seconds:.0f}",
                     f"`{(prov.get('commit') or '?')[:10]}` ({clean})"])
    return table(["result", "command (from the repository root)", "wall s", "commit"], rows)


def main() -> None:
    template = (HERE / "REPORT_TEMPLATE.md").read_text()
    values = {
        "key_screen_minilm": key_screen("minilm"),
        "key_screen_smollm2": key_screen("smollm2"),
        "paraphrase_table": paraphrase_table(),
        "projection_table": projection_table(),
        "e2e_shape_minilm": e2e_shape("minilm"),
        "e2e_shape_smollm2": e2e_shape("smollm2"),
        "commands": commands(),
        "probe_cells": PROBE_CELLS,
        "e2e_note": E2E_NOTE,
    }
    for model in MODELS:
        for floor, tag, _ in E2E_VIEWS:
            values[f"e2e_{model}_{tag}"] = e2e_table(model, floor)
    values.update(figures())
    text = template.format(**values)
    (HERE / "REPORT.md").write_text(
        "<!-- Generated by `python evaluation/generality/report.py` from results/*.json; do not edit. -->\n\n" + text)
    print(f"wrote {HERE / 'REPORT.md'}")


def figures() -> dict:
    """Single figures quoted in the prose (named ``fig_*`` in the template) and the prose blocks built on them."""
    out: dict = {}
    probe = load("probe_minilm_paraphrases")
    a, b = probe["results"][0]["A"], probe["results"][0]["B"]
    q, sf = b["questions"], b["same_fact_locality_questions"]
    n_loc = q["relation"] + q["unedited"]
    out.update(
        fig_a_records=a["records"], fig_b_records=b["records"], fig_b_edited=b["edited"], fig_b_batches=b["batches"],
        fig_b_held=b["never_edited"], fig_b_rel=q["relation"], fig_b_une=q["unedited"], fig_b_sf_rel=sf["relation"],
        fig_b_sf_une=sf["unedited"], fig_b_sf_share=same_fact_share(),
        fig_b_raw_budget=f"{0.02 * n_loc:.0f}", fig_b_loc=n_loc,
        fig_top=6,
    )
    for model in ("minilm", "smollm2"):
        screen = load(f"probe_{model}_keys")
        out[f"fig_screen_{model}_n"] = len(screen["results"]) if screen else "–"
        out[f"fig_extract_{model}"] = f"{screen['key_extraction']['seconds']:.0f}" if screen else "–"
        out["fig_extract_texts"] = screen["key_extraction"]["texts"] if screen else "–"
    facts = load("data_facts")
    out.update(fig_junk_records=facts["records_with_such_prompts"], fig_junk=facts["generate_prompts_not_questions"],
               fig_generate=f"{facts['generate_prompts']:,}", fig_own=facts["relation_questions_of_own_fact"],
               fig_relation=f"{facts['relation_questions']:,}",
               fig_own_share=f"{facts['relation_questions_of_own_fact'] / facts['relation_questions']:.0%}")
    prefixes = load("prefixes_smollm2")
    out["fig_prefixes"] = len(prefixes["prefixes"]) if prefixes else "–"
    out.update(prose(out))
    return out


def find_probe(name: str, key_function: str, paraphrases: int) -> dict | None:
    data = load(name)
    if data is None:
        return None
    return next((r for r in data["results"] if r["key_function"] == key_function and r["paraphrases"] == paraphrases),
                None)


def default_router(model: str, paraphrases: int = 0) -> dict | None:
    """The probe result of the model's shipped router (:data:`DEFAULT_ROUTERS`) with ``paraphrases`` per edit."""
    name, key_function = DEFAULT_ROUTERS[model]
    return find_probe(name, key_function, paraphrases)


def projected(model: str, paraphrases: int = 0, projection: bool = True) -> dict | None:
    """The probe result of the model's projection run (:data:`PROJECTIONS`), with or without the projection."""
    name, key_function = PROJECTIONS[model]
    return find_probe(name, key_function + ("+proj" if projection else ""), paraphrases)


def bound(result: dict | None, floor: str) -> dict | None:
    """The routing bound on B at part A's radius for ``floor`` (None if not run)."""
    return None if result is None else at_a(result, floor)


def ceiling(result: dict | None, floor: str) -> dict | None:
    """The best point on B with the radius fitted on B itself for ``floor`` (None if not run)."""
    return None if result is None else result["B"]["summary"][floor]["best"]


def best_ceiling(floor: str) -> tuple[dict, str, dict] | None:
    """Over every probe and projection result on file: the best generate generality on B with the radius fitted
    on B itself at ``floor``, as (point, result file, result); None if nothing was run."""
    found = []
    for path in sorted([*RESULTS.glob("probe_*.json"), *RESULTS.glob("projection_*.json")]):
        for result in json.loads(path.read_text())["results"]:
            point = result["B"]["summary"][floor]["best"]
            if point:
                found.append((point, path.stem, result))
    return max(found, key=lambda found: found[0]["generate"], default=None)


def same_fact_share() -> str:
    """Share of B's locality questions that ask an edited fact in other words (``common.same_fact``)."""
    probe = load("probe_minilm_paraphrases")
    if probe is None:
        return "(not run)"
    b = probe["results"][0]["B"]
    q, sf = b["questions"], b["same_fact_locality_questions"]
    return f"{(sf['relation'] + sf['unedited']) / (q['relation'] + q['unedited']):.1%}"


def e2e_point(model: str, variant: str, floor: str | None) -> dict | None:
    v = e2e_variants(model).get(variant)
    if v is None:
        return None
    return v if floor is None else grid_point(v, floor)


def oracle(model: str, variant: str) -> str:
    """Generate generality of a variant's blocks under the oracle router."""
    v = e2e_variants(model).get(variant)
    return "(not run)" if v is None else f2(v["oracle_routing"]["gen_generate"])


def gg(point: dict | None, locality: str = "locality") -> str:
    """``generate / rephrase (locality X)`` of a probe or e2e point."""
    if point is None:
        return "(not run)"
    generate = point.get("gen_generate", point.get("generate"))
    rephrase = point.get("gen_rephrase", point.get("rephrase"))
    kind = "clean locality" if locality == "locality_clean" else "locality"
    return f"{f2(generate)} / {f2(rephrase)} ({kind} {f3(point[locality])})"


def summary_lines() -> list[str]:
    """EVALUATION.md's summary of this research: Markdown bullets, every figure read from the results (a missing
    one reads "(not run)"), the words fixed."""

    def clean(point: dict | None) -> str:
        return gg(point, "locality_clean")

    top = best_ceiling(RAW98)
    top_text = "(not run)" if top is None else (
        f"{f2(top[0]['generate'])} (`{top[2]['key_function']}` with {top[2]['paraphrases']} paraphrases per edit, "
        f"`{top[1]}.json`)")
    return [
        f"- **MELO as shipped.** End to end at the library's default radius: {gg(e2e_point('minilm', 'melo', None))} "
        f"on MiniLM (demo router), {gg(e2e_point('smollm2', 'melo', None))} on SmolLM2 (default router). Routing "
        f"bound of those routers at part A's radius for raw locality ≥ 0.98: "
        f"{gg(bound(default_router('minilm'), RAW98))} and {gg(bound(default_router('smollm2'), RAW98))}.",
        "- **A trained key projection** (a linear map on the router keys, trained once per model on part A's "
        "paraphrase groups with same-subject hard negatives; research, not shipped), at part A's radius for clean "
        f"locality ≥ 0.99: MiniLM end to end {clean(e2e_point('minilm', 'proj', CLEAN99))}; SmolLM2 (mean key of "
        f"`layers.3.mlp.up_proj`) routing bound {clean(bound(projected('smollm2'), CLEAN99))}, end to end "
        f"{clean(e2e_point('smollm2', 'proj', CLEAN99))}.",
        "- **3 user paraphrases per edit**, clean locality ≥ 0.99: MiniLM demo router's routing bound "
        f"{clean(bound(default_router('minilm', 0), CLEAN99))} → {clean(bound(default_router('minilm', 3), CLEAN99))}; "
        f"with the projection, end to end {clean(e2e_point('minilm', 'proj', CLEAN99))} → "
        f"{clean(e2e_point('minilm', 'proj_para3', CLEAN99))}.",
        f"- **Raw vs clean locality.** {same_fact_share()} of part B's locality questions ask an edited fact in other "
        "words: raw locality (the issue's definition) counts each one routed to its edit as a failure, clean "
        "locality leaves them out. At raw locality ≥ 0.98 the highest routing bound of any setting probed, even with "
        f"the radius fitted on B itself, is {top_text}.",
        "- **Shipped:** `MeloEditor.edit_texts(..., paraphrases=[[...], ...])`, user-written wordings of each prompt "
        "as rows of the same edit (default `None`: MELO's behaviour). The trained key projection is not shipped.",
    ]


def prose(fig: dict) -> dict:
    """The prose blocks of the template. Every number is read from the results; the words are fixed."""
    out = {}
    p_melo_m, p_para_m = default_router("minilm", 0), default_router("minilm", 3)
    p_proj_m0, p_proj_m3 = projected("minilm", 0), projected("minilm", 3)
    p_melo_s = default_router("smollm2", 0)
    p_proj_s0, p_proj_s3 = projected("smollm2", 0), projected("smollm2", 3)
    screen = {m: screen_stats(m) for m in MODELS}
    raw98, clean99 = RAW98, CLEAN99
    b, best = bound, ceiling

    e = {(m, v, f): e2e_point(m, v, f) for m in ("minilm", "smollm2")
         for v in ("melo", "para3", "prefix", "para3_prefix", "proj", "proj_para3", "proj_prefix", "proj_single",
                   "text_proj", "text_proj_para3")
         for f in (None, raw98, clean99)}
    out["summary"] = GENERALITY_NOTE + f"""

- **Plain MELO does not generalize, and no key function fixes it.** End to end, MELO as configured today gives
  {gg(e["minilm", "melo", None])} on MiniLM and {gg(e["smollm2", "melo", None])} on SmolLM2 (100 records). Over
  {screen["minilm"].get("functions")} MiniLM and {screen["smollm2"].get("functions")} SmolLM2 key functions (layer,
  module, last/mean token, Euclidean/cosine) the routing bound on held-out generate prompts at raw locality ≥ 0.98
  is at most {f2(screen["minilm"].get(raw98))} (MiniLM) and {f2(screen["smollm2"].get(raw98))} (SmolLM2). SmolLM2's
  default key (last token of `layers.19.mlp.up_proj`) is the worst of all: a held-out paraphrase's nearest edit
  key is its own edit's only {f2(p_melo_s and p_melo_s["B"]["nn_generate"])} of the time.
- **A trained key projection is the lever** (section 2b): a linear map on the router keys, trained once per model
  on part A's paraphrase groups with same-subject hard negatives (under a minute of CPU), then frozen. MiniLM end to
  end at part A's radius for clean locality ≥ 0.99: {gg(e["minilm", "proj", clean99], "locality_clean")}; with 3 user
  paraphrases per edit {gg(e["minilm", "proj_para3", clean99], "locality_clean")}. SmolLM2 (key: mean of
  `layers.3.mlp.up_proj`, projected), routing bound {gg(b(p_proj_s3, clean99), "locality_clean")} with 3
  paraphrases; end to end {gg(e["smollm2", "proj_para3", clean99], "locality_clean")}.
- **User paraphrases help most together with the projection**; alone they barely move the bound (MiniLM:
  {gg(b(p_melo_m, clean99), "locality_clean")} without, {gg(b(p_para_m, clean99), "locality_clean")} with 3), because
  a merged cluster's radius grows to its paraphrases' spread and it then captures same-subject questions.
- **Once routed, blocks already answer paraphrases** on MiniLM (oracle routing: {oracle("minilm", "melo")}); on
  SmolLM2 the oracle gives
  {oracle("smollm2", "melo")} for plain blocks and
  {oracle("smollm2", "prefix")} for blocks trained
  under generated prefixes, {oracle("smollm2", "para3")}
  with 3 paraphrases (section 2c).
- **The target (generality ≥ 0.6 at locality ≥ 0.98) is met on clean locality, not on raw locality.**
  {fig["fig_b_sf_share"]} of B's locality questions ask an edited fact in other words ({fig["fig_own_share"]} of
  the dev file's relation questions ask their own record's edit); on raw locality no method reaches the target,
  and none can without refusing real paraphrases: with the radius fitted on B itself, the best routing bound at
  raw locality ≥ 0.98 is {f2(best(p_proj_m3, raw98)["generate"] if best(p_proj_m3, raw98) else None)} (MiniLM,
  projection + 3 paraphrases).

**Shipped since:** `paraphrases=` in `MeloEditor.edit_texts` (user-written wordings of each prompt become rows
of the same edit; default `None` = MELO's behaviour). The trained key projection is not shipped yet.
**Recommendation** (section 5): ship the projection (with a mean-token router in an early layer for decoder LMs)
as an option, default off until a projection ships with the model; report clean locality beside raw locality.
MELO's behaviour stays the default setting."""
    out["probe_findings"] = f"""\
What the probe shows:
- No key function gets near the target: at raw locality ≥ 0.98 the best held-out generate generality on B is
  {f2(screen["minilm"].get(raw98))} on MiniLM and {f2(screen["smollm2"].get(raw98))} on SmolLM2; even on clean
  locality ≥ 0.99 it is {f2(screen["minilm"].get(clean99))} and {f2(screen["smollm2"].get(clean99))}. Rephrase
  generality is higher (rephrases are shorter edits of the question), up to {f2(screen["minilm"].get(raw98 + "_reph"))}
  and {f2(screen["smollm2"].get(raw98 + "_reph"))} at raw ≥ 0.98.
- The ordering is mostly right and the radius is what fails: for MiniLM's demo router a held-out paraphrase's
  nearest edit key is its own edit's {f2(p_melo_m and p_melo_m["B"]["nn_generate"])} of the time, yet a radius that
  reaches it also reaches questions about the same subject. Misrouting (a paraphrase landing in another edit's
  block) stays small at these radii; locality is the binding constraint.
- SmolLM2's last-token keys do not identify the question (NN own {f2(p_melo_s and p_melo_s["B"]["nn_generate"])}
  for the default router): at a question's final "?" the state of a 135M model carries little of the subject.
  Mean keys of early layers order paraphrases well (NN own up to about 0.9) but put same-subject questions even
  closer.
- The radius transfers from A to B as a multiple of the neutral-prompt key scale: the locality at A's radius on B
  stays close to the floor for raw keys."""
    out["paraphrase_findings"] = f"""\
Three user paraphrases per edit raise the routing bound only a little on raw keys (MiniLM demo router, clean
locality ≥ 0.99: {gg(b(p_melo_m, clean99), "locality_clean")} → {gg(b(p_para_m, clean99), "locality_clean")}).
Why: MELO's insert merges a paraphrase into its edit's cluster and sets the radius to the cluster's spread, so the
ball around the mean of the phrasings grows to cover the gaps between them, where same-subject questions also lie;
paraphrases of different edits also conflict and split each other's clusters. With the projection the phrasings of
a fact sit close together, the spread stays small and the gain is real (MiniLM
{gg(b(p_proj_m0, clean99), "locality_clean")} → {gg(b(p_proj_m3, clean99), "locality_clean")}; SmolLM2
{gg(b(p_proj_s0, clean99), "locality_clean")} → {gg(b(p_proj_s3, clean99), "locality_clean")})."""
    cost = load("cost")
    if cost:
        cm, cs = cost["results"]["minilm"], cost["results"]["smollm2"]
        out["cost_note"] = "`cost.json`, CPU time of one thread"
        out["cost_text"] = (
            f"the keys of the {cm['texts']} training texts through the library's `MeloEditor.keys` (the forward "
            f"pass stops at the router) take {cm['key_cpu_seconds']:.0f} s on MiniLM and {cs['key_cpu_seconds']:.0f} s "
            f"on SmolLM2 (router in layer 3); {cm['train_steps']} training steps take {cm['train_cpu_seconds']:.0f} s "
            f"and {cs['train_cpu_seconds']:.0f} s. The projection has {cm['parameters']:,} and {cs['parameters']:,} "
            f"parameters (plus the keys' mean and std), a few hundred kilobytes to save with the edits. Editing "
            f"and serving add one small matrix product per key.")
    else:
        out["cost_note"], out["cost_text"] = "not run", "(cost.json missing)"
    out["projection_findings"] = f"""\
- On subjects it never saw, the projection turns MiniLM's routing bound at clean locality ≥ 0.99 from
  {gg(b(projected("minilm", 0, projection=False), clean99), "locality_clean")} into
  {gg(b(p_proj_m0, clean99), "locality_clean")}, and SmolLM2's (mean of `layers.3.mlp.up_proj`) from
  {gg(b(projected("smollm2", 0, projection=False), clean99), "locality_clean")} into
  {gg(b(p_proj_s0, clean99), "locality_clean")}.
- The radius must be chosen on subjects the projection did not train on: on its own training records locality
  looks too good (their same-subject questions were its negatives); chosen there, the radius broke the locality
  floor on B. `A_val` (20% of A's subjects) fixes that, at the price of a noisy choice (about 200 locality
  questions): B's locality at A_val's radius is printed in every cell.
- Which key to project (chosen by the validation loss on A_val, table above): SmolLM2's last-token keys stay poor
  even projected; mean keys of an early layer are best. The library's router must be an `nn.Linear`, so
  `layers.3.mlp.up_proj` (a linear image of the normalised residual stream, same information) is used rather than
  `layers.3.post_attention_layernorm`.
- Unseen relations: B shares most relations with A (zsRE has few), so this split does not test a new relation;
  the subjects, and so the records, are new. The SmolLM2 projection overfits more than MiniLM's (A_val loss vs
  training loss in the JSON): a 135M LM's states are a weaker basis than a sentence encoder's."""
    out["prefix_findings"] = f"""\
- MiniLM: blocks already give the new answer to almost every paraphrase that reaches them (oracle
  {oracle("minilm", "melo")} for plain MELO blocks), so
  prefixes have nothing to add (`prefix`: {oracle("minilm", "prefix")}).
- SmolLM2: plain blocks {oracle("smollm2", "melo")} under
  the oracle router, blocks trained under prefixes
  {oracle("smollm2", "prefix")}, with 3 paraphrases
  {oracle("smollm2", "para3")}. Prefix rows cost 4× the
  training rows (edit CPU time per edit in the tables).
- A margin for never-edited questions has nothing left to catch on this data: at every radius chosen here the
  *clean* never-edited locality is at or near 1.000 (probe JSON `loc_unedited_clean`); the never-edited questions
  that get routed are the ones that repeat an edited fact. The same-subject relation questions are the clean
  failures, and the projection's hard negatives are what keeps them out (a margin learned once per model rather
  than per edit)."""
    out["e2e_findings"] = ""
    out["did_not_work"] = ""
    out["recommendation"] = ""
    return out


if __name__ == "__main__":
    sys.exit(main())
