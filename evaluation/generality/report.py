"""Write ``evaluation/generality/REPORT.md`` from the committed JSON results in ``results/``.

    python evaluation/generality/report.py

Every figure in the report is read from a JSON written by one of the scripts of this folder (the JSON
records its own command); the prose between the tables lives in ``REPORT_TEMPLATE.md`` and takes its
figures from the same JSON through ``{placeholders}`` filled here. A missing JSON renders as "not run".
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FLOORS = ("locality>=0.99", "locality>=0.98", "locality_clean>=0.99", "locality_clean>=0.98")
FLOOR_NAMES = {"locality>=0.99": "raw ≥ 0.99", "locality>=0.98": "raw ≥ 0.98",
               "locality_clean>=0.99": "clean ≥ 0.99", "locality_clean>=0.98": "clean ≥ 0.98"}


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


def paraphrase_table() -> str:
    rows = []
    for model in ("minilm", "smollm2"):
        data = load(f"probe_{model}_paraphrases")
        if data:
            rows += [[model, *probe_row(r)] for r in data["results"] if r["metric"] == "l2"]
        for name in projection_names(model):
            data = load(name)
            rows += [[model, *probe_row(r)] for r in data["results"]]
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
    }
    for model in ("minilm", "smollm2"):
        for floor, tag in ((None, "main"), ("locality>=0.98", "raw98"), ("locality_clean>=0.99", "clean99")):
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
        fig_b_sf_une=sf["unedited"], fig_b_sf_share=f"{(sf['relation'] + sf['unedited']) / n_loc:.1%}",
        fig_b_raw_budget=f"{0.02 * n_loc:.0f}", fig_b_loc=n_loc,
        fig_top=6,
    )
    for model in ("minilm", "smollm2"):
        screen = load(f"probe_{model}_keys")
        out[f"fig_screen_{model}_n"] = len(screen["results"]) if screen else "–"
        out[f"fig_extract_{model}"] = f"{screen['key_extraction']['seconds']:.0f}" if screen else "–"
        out["fig_extract_texts"] = screen["key_extraction"]["texts"] if screen else "–"
    prefixes = load("prefixes_smollm2")
    out["fig_prefixes"] = len(prefixes["prefixes"]) if prefixes else "–"
    out.update(prose(out))
    return out


def prose(fig: dict) -> dict:
    """The prose blocks of the template (filled in by the findings; see REPORT_TEMPLATE.md)."""
    return {name: "" for name in ("summary", "probe_findings", "paraphrase_findings", "projection_findings",
                                   "prefix_findings", "e2e_findings", "did_not_work", "recommendation",
                                   "cost_note", "cost_text")}


if __name__ == "__main__":
    sys.exit(main())
