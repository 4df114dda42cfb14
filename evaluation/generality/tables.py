"""The results in ``results/*.json``, read and laid out: probe and end-to-end tables, the lookups behind
them, and the notes and summary that EVALUATION.md quotes.

Shared by this folder's ``REPORT.md`` (``report.py``, which adds the prose and the tables only it shows)
and EVALUATION.md's section on issue 22 (``evaluation/report.py`` imports this module): :func:`summary_lines`,
:func:`default_router_table`, :func:`paraphrase_table` (restricted to :data:`PROJECTIONS`), :func:`e2e_table`
with :data:`E2E_VIEWS`, and the notes :data:`GENERALITY_NOTE`, :data:`PROBE_CELLS` and :data:`E2E_NOTE`. Every
reader here finds the files through :data:`RESULTS`, read when called; a missing JSON renders as "not run".
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FLOORS = ("locality>=0.99", "locality>=0.98", "locality_clean>=0.99", "locality_clean>=0.98")
FLOOR_NAMES = {"locality>=0.99": "raw ≥ 0.99", "locality>=0.98": "raw ≥ 0.98",
               "locality_clean>=0.99": "clean ≥ 0.99", "locality_clean>=0.98": "clean ≥ 0.98"}
RAW98, CLEAN99 = "locality>=0.98", "locality_clean>=0.99"
MODELS = ("minilm", "smollm2")
MODEL_NAMES = {"minilm": "MiniLM", "smollm2": "SmolLM2"}
SPLITS = {"": "first", "split1": "second"}  # subfolder of a results folder -> the split of the dev file
VORONOI = "voronoi"  # the folder of RESULTS with the runs whose projections chose their radii under the voronoi rule
NUMBERS = "numbers"  # the folder of RESULTS with the projections trained with number negatives, and their runs
HALVES = "halves"  # the same maps, their radii judged on both halves of each held-out fold, and their runs
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
edit. The radius column is the database's; in the `kp_para` rows the keys of an edit given with paraphrases use
the projection's radius for that many paraphrases (the shipped table above)."""


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


# The kp paraphrase variants since an edit's wordings get the projection's paraphrase radius
# (melo_fast/vecdb/wordings.py); the earlier files hold them as measured before, at its one radius.
WORDINGS_RUN = "wordings"


def e2e_variants(model: str, before_wordings: bool = False) -> dict:
    """Every variant of the e2e JSONs of a model (``e2e_<model>*.json``), in file then run order (a later file's
    variant replaces an earlier one of the same name). ``before_wordings``: leave out ``e2e_<model>_wordings*.json``
    (the kp paraphrase variants as they were measured before them)."""
    variants = {}
    for path in sorted(RESULTS.glob(f"e2e_{model}*.json")):
        if not (before_wordings and path.stem.startswith(f"e2e_{model}_{WORDINGS_RUN}")):
            variants.update(json.loads(path.read_text())["variants"])
    return variants


def wordings_variants(folder: Path, model: str) -> dict:
    """The kp paraphrase variants run since an edit's wordings get their own radius (``e2e_<model>_wordings*.json``
    in ``folder``, later files replacing earlier ones)."""
    variants = {}
    for path in sorted(folder.glob(f"e2e_{model}_{WORDINGS_RUN}*.json")):
        variants.update(json.loads(path.read_text())["variants"])
    return variants


def e2e_not_run(model: str) -> list[str]:
    """Variants an ``e2e_<model>*.json``'s recorded command asks for (``--variants``) that no such file holds (a
    later run may have written them to another file, e.g. ``e2e_minilm_para.json``)."""
    held = e2e_variants(model)
    missing = []
    for path in sorted(RESULTS.glob(f"e2e_{model}*.json")):
        argv = shlex.split(json.loads(path.read_text()).get("command", ""))
        if "--variants" in argv[:-1]:
            missing += [v for v in argv[argv.index("--variants") + 1].split(",") if v not in held and v not in missing]
    return missing


def e2e_row(name: str, v: dict, floor: str | None) -> list[str]:
    r = v if floor is None else grid_point(v, floor)
    if r is None:
        return [name, "–"] + ["–"] * (len(E2E_HEADER) - 2)
    per_edit = v["edit_cpu_seconds"] / max(1, v["edits"])
    # A shipped key projection's radius is absolute (its keys are unit vectors, without a key scale).
    absolute = floor is None and not v.get("key_scale")
    radius = f"{v['init_radius']:.2f} (abs)" if absolute else f"{r['relative_radius']:.3f}"
    return [name, radius, f3(v["es"]) if floor is None else "", f3(r["err"]),
            f3(r["gen_rephrase"]), f3(r["gen_generate"]), f3(r["generate_routed_own"]), f3(r["generate_misrouted"]),
            f3(r["gen_generate_given_routed"]), f3(v["oracle_routing"]["gen_generate"]), f3(r["loc_relation"]),
            f3(r["loc_unedited"]), f3(r["locality"]), f3(r["locality_clean"]), f"{per_edit:.2f}"]


def e2e_table(model: str, floor: str | None) -> str:
    variants = e2e_variants(model)
    if not variants:
        return f"(not run: no `e2e_{model}*.json`)"
    return table(E2E_HEADER, [e2e_row(name, v, floor) for name, v in variants.items()])


def e2e_shape(model: str) -> str:
    files = sorted(RESULTS.glob(f"e2e_{model}*.json"))
    if not files:
        return "not run"
    data = json.loads(files[0].read_text())
    s = data["shape"]
    q = s["probe_questions"]
    return (f"{s['records']} part-B records ({s['edited']} edited in {s['batches']} batches of 10, "
            f"{s['held_out']} never edited); probes: {q['rephrase']} rephrase, {q['generate']} held-out generate, "
            f"{q['locality_relation']} relation and {q['locality_unedited']} never-edited locality questions, of "
            f"which {s['same_fact']['locality_relation']} and {s['same_fact']['locality_unedited']} ask an edited fact")


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
        "paraphrase groups with same-subject hard negatives; the research prototype), at part A's radius for clean "
        f"locality ≥ 0.99: MiniLM end to end {clean(e2e_point('minilm', 'proj', CLEAN99))}; SmolLM2 (mean key of "
        f"`layers.3.mlp.up_proj`) routing bound {clean(bound(projected('smollm2'), CLEAN99))}, end to end "
        f"{clean(e2e_point('smollm2', 'proj', CLEAN99))}.",
        "- **3 user paraphrases per edit**, clean locality ≥ 0.99: MiniLM demo router's routing bound "
        f"{clean(bound(default_router('minilm', 0), CLEAN99))} → {clean(bound(default_router('minilm', 3), CLEAN99))}; "
        f"plain MELO end to end {clean(e2e_point('minilm', 'melo', CLEAN99))} → "
        f"{clean(e2e_point('minilm', 'para3', CLEAN99))}; "
        f"with the projection, end to end {clean(e2e_point('minilm', 'proj', CLEAN99))} → "
        f"{clean(e2e_point('minilm', 'proj_para3', CLEAN99))}.",
        f"- **Raw vs clean locality.** {same_fact_share()} of part B's locality questions ask an edited fact in other "
        "words: raw locality counts each one routed to its edit as a failure, clean locality leaves them out. At raw "
        "locality ≥ 0.98 the highest routing bound of any setting probed, even with the radius fitted on B itself, is "
        f"{top_text}. {raw_locality_ceiling()}",
        "- **Shipped:** `MeloEditor.edit_texts(..., paraphrases=[[...], ...])`, user-written wordings of each prompt "
        "as rows of the same edit (default `None`: MELO's behaviour); and `melo_fast.KeyProjection`, trained once per "
        "model by `melo_fast.train_key_projection` (or `python -m melo_fast projection`) and passed to "
        "`melo_fast.patch(..., key_projection=...)` (default `None`: MELO's raw keys). End to end on B at the radius "
        f"it chose on A: MiniLM {shipped('minilm', 'kp')}, with 3 paraphrases {shipped('minilm', 'kp_para3')}; "
        f"SmolLM2 {shipped('smollm2', 'kp')}, with 3 paraphrases {shipped('smollm2', 'kp_para3')}, MELO "
        f"{shipped('smollm2', 'melo')}. Those projections chose their radii under MELO's conflict split; projections "
        f"trained since choose them under the voronoi rule, and edit under it: {e2e_results()}. Projections "
        "trained now also learn from questions about a neighbouring numbered subject (`number_negatives`, "
        f"\"Negatives with a neighbouring number\" below): {e2e_results(NUMBERS)}. Their radii are now judged on "
        f"both halves of each held-out fold (\"Both halves judge the radius\" below): {e2e_results(HALVES)}. "
        + target_line(),
    ]


TARGET_GENERALITY, TARGET_LOCALITY = 0.6, 0.98  # issue 22's target


def raw_locality_ceiling() -> str:
    """Why the target is read on clean locality: the raw locality an editor generalizing as the target asks can
    keep, from the same-fact counts of the voronoi end-to-end runs (``shape.same_fact``), and how those
    questions behaved there."""
    runs = [json.loads(run.read_text()) for run in sorted((RESULTS / VORONOI).rglob("e2e_*.json"))]
    if not runs:
        return ""
    shares = [sum(r["shape"]["same_fact"].values()) / (r["shape"]["probe_questions"]["locality_relation"]
                                                       + r["shape"]["probe_questions"]["locality_unedited"])
              for r in runs]
    variants = [v for r in runs for v in r["variants"].values()]
    repeated = [1 - v["loc_unedited_same_fact_kept"] for v in variants]
    general = [v["gen_generate"] for v in variants]
    share = min(shares)
    return (
        f"An editor that changes the answer of a fraction g of those questions has raw locality at most "
        f"1 − g × their share ({share:.1%} or more in every split): at most {1 - TARGET_GENERALITY * share:.3f} "
        f"at g = {TARGET_GENERALITY}, and raw locality ≥ {TARGET_LOCALITY} allows a changed answer on at most "
        f"{(1 - TARGET_LOCALITY) / share:.0%} of them. Nothing tells those questions apart from the held-out "
        "paraphrases that generality counts: in the voronoi end-to-end runs, the never-edited questions that ask an "
        f"edited fact again changed their answer {min(repeated):.2f}–{max(repeated):.2f} of the time, while held-out "
        f"generate prompts got the new answer {min(general):.2f}–{max(general):.2f} of the time. Generality ≥ "
        f"{TARGET_GENERALITY} and raw locality ≥ {TARGET_LOCALITY} cannot both hold, so the target is read on clean "
        "locality, which keeps every other never-edited question; raw locality is reported beside it.")


def _e2e_runs(folder: str):
    """Each end-to-end run of ``results/<folder>/**/e2e_*.json``, in path order: its folder relative to
    ``folder``, its JSON, its split's subfolder (a key of :data:`SPLITS`) and which part-B records it ran."""
    for run in sorted((RESULTS / folder).rglob("e2e_*.json")):
        relative = run.parent.relative_to(RESULTS / folder)
        data = json.loads(run.read_text())
        sub = relative.parts[0] if relative.parts and relative.parts[0] in SPLITS else ""
        yield relative, data, sub, "all" if data["shape"]["records"] >= 400 else f"first {data['shape']['records']}"


def e2e_results(folder: str = VORONOI) -> str:
    """Each end-to-end run with a projection of ``folder`` (``results/<folder>/**/e2e_*.json``), as :func:`shipped`
    reads."""
    parts = []
    for _, data, sub, records in _e2e_runs(folder):
        for name, v in data["variants"].items():
            parts.append(f"{data['model']} ({SPLITS[sub]} split, {records} of B) {SHIPPED_VARIANTS.get(name, name)} "
                         f"{f2(v['gen_generate'])} / {f2(v['gen_rephrase'])} (locality {f3(v['locality'])}, clean "
                         f"{f3(v['locality_clean'])}, {v['edits']} edits)")
    return "; ".join(parts) if parts else "(not run)"


def shipped(model: str, variant: str) -> str:
    """``generate / rephrase (locality X, clean Y)`` of an end-to-end run at its own radius."""
    v = e2e_variants(model).get(variant)
    if v is None:
        return "(not run)"
    return (f"{f2(v['gen_generate'])} / {f2(v['gen_rephrase'])} (locality {f3(v['locality'])}, clean "
            f"{f3(v['locality_clean'])}, {v['edits']} edits)")


# --- the shipped key projection (melo_fast.KeyProjection) ---------------------------------------------
SHIPPED_HEADER = ["model", "key function", "radius; with 1, 2, 3 paraphrases (chosen on A)", "training s (1 thread)",
                  "A held out: locality (negatives / never edited)",
                  "A held out: paraphrases routed (0 / 3 given)", "variant", "edits (B)", "ES", "ERR",
                  "gen generate / rephrase", "locality", "locality clean", "edit CPU s / edit"]
SHIPPED_VARIANTS = {"melo": "MELO (no projection)", "kp": "projection", "kp_para1": "projection + 1 paraphrase",
                    "kp_para2": "projection + 2 paraphrases", "kp_para3": "projection + 3 paraphrases",
                    "kp_prefix3": "projection + 3 prefixed rows"}


def paraphrased(training: dict) -> dict[int, dict]:
    """A projection's held-out figures per number of paraphrases given (``info["held_out_paraphrased"]``)."""
    return {int(k): v for k, v in training.get("held_out_paraphrased", {}).items() if k.isdigit()}


def shipped_rows(model: str) -> list[list[str]]:
    """The shipped projection of ``model`` (``library_projection_<model>.json``) and its end-to-end runs on B."""
    trained = load(f"library_projection_{model}")
    if trained is None:
        return [[model, "(not run)"] + ["–"] * (len(SHIPPED_HEADER) - 2)]
    before = e2e_variants(model, before_wordings=True)
    since = wordings_variants(RESULTS, model)
    runs = [(name, before.get(name), "") for name in ("melo", "kp")]
    for name in ("kp_para1", "kp_para3"):
        runs.append((name, before.get(name), ", one radius" + (" (before)" if name in since else "")))
    runs += [(name, since.get(name), " (paraphrase radius)") for name in ("kp_para1", "kp_para3")]
    runs.append(("kp_prefix3", before.get("kp_prefix3"), ""))
    training = trained["training"]
    held, worded = training["held_out"], paraphrased(training)
    localities = [v for k, v in held.items() if k.startswith("locality_negatives")], [
        v for k, v in held.items() if k.startswith("locality_never_edited")]
    most = worded[max(worded)] if worded else None
    head = [model, f"`{trained['router']}` ({trained['key_position']})",
            f"{trained['radius']:.2f}; " + (", ".join(f"{worded[k]['radius']:.2f}" for k in sorted(worded)) or "–"),
            f"{training['seconds']:.0f}", f"{f3(min(localities[0]))} / {f3(min(localities[1]))}",
            f"{f3(held['paraphrases_routed'])} / {f3(most['paraphrases_routed']) if most else '–'}"]
    rows = []
    for name, v, how in runs:
        if v is None or (name == "melo" and model == "minilm"):
            continue  # MiniLM's MELO row is in the tables below (at its default radius)
        rows.append(head + [SHIPPED_VARIANTS[name] + how, str(v["edits"]), f3(v["es"]), f3(v["err"]),
                            f"{f2(v['gen_generate'])} / {f2(v['gen_rephrase'])}", f3(v["locality"]),
                            f3(v["locality_clean"]), f"{v['edit_cpu_seconds'] / max(1, v['edits']):.2f}"])
        head = [""] * len(head)
    return rows or [head + ["(no end-to-end run)"] + ["–"] * (len(SHIPPED_HEADER) - len(head) - 1)]


def shipped_table() -> str:
    return table(SHIPPED_HEADER, [row for model in MODELS for row in shipped_rows(model)])


def shipped_curve(model: str = "minilm") -> str:
    """The shipped projection's end-to-end run replayed at absolute radii (``kp``'s grid)."""
    v = e2e_variants(model).get("kp")
    if v is None or not v.get("grid"):
        return "(not run)"
    rows = [[f"{p['relative_radius']:.2f}", f"{f2(p['gen_generate'])} / {f2(p['gen_rephrase'])}", f3(p["err"]),
             f3(p["loc_relation"]), f3(p["loc_unedited"]), f3(p["locality"]), f3(p["locality_clean"])]
            for p in v["grid"]]
    return table(["radius", "gen generate / rephrase", "ERR", "loc relation", "loc never-edited", "locality",
                  "locality clean"], rows)


def other_split_lines() -> list[str]:
    """The shipped projection re-run on another by-subject split (``results/split1/``): trained on its part A,
    reported on its part B, beside plain MELO on the same B."""
    folder = RESULTS / "split1"
    rows = []
    for model in MODELS:
        trained = folder / f"library_projection_{model}.json"
        variants, before = {}, {}
        for run in sorted(folder.glob(f"e2e_{model}*.json")):
            found = json.loads(run.read_text())["variants"]
            variants.update(found)
            if not run.stem.startswith(f"e2e_{model}_{WORDINGS_RUN}"):
                before.update(found)
        if not (trained.exists() and variants):
            continue
        trained = json.loads(trained.read_text())
        radius = trained["radius"]
        worded = paraphrased(trained["training"])
        paraphrase_radius = worded[3]["radius"] if 3 in worded else None
        since = bool(wordings_variants(folder, model))
        for label, v, shown_radius in (
                ("MELO (default radius)", variants.get("melo"), None),
                ("projection", variants.get("kp"), radius),
                ("projection + 3 paraphrases, one radius" + (" (before)" if since else ""), before.get("kp_para3"),
                 radius),
                ("projection + 3 paraphrases (paraphrase radius)", variants.get("kp_para3") if since else None,
                 paraphrase_radius)):
            if v is None:
                continue
            rows.append([model, label, "–" if shown_radius is None else f"{shown_radius:.2f}", str(v["edits"]),
                         f3(v["es"]), f3(v["err"]), f"{f2(v['gen_generate'])} / {f2(v['gen_rephrase'])}",
                         f3(v["locality"]), f3(v["locality_clean"])])
    if not rows:
        return ["(not run: no `results/split1/`)"]
    return [table(["model", "variant", "radius (chosen on A)", "edits (B)", "ES", "ERR", "gen generate / rephrase",
                   "locality", "locality clean"], rows)]


LARGER_RUNS = {"all_b": ("first", "all"), "split1/first_200": ("second", "first 200")}


def larger_runs_lines() -> list[str]:
    """SmolLM2's shipped-projection runs on more part-B records than the shipped table's first 100: every record of
    the first split (``results/all_b/``) and the first 200 of the second (``results/split1/first_200/``); the
    radius of the edits' keys is read from the split's ``library_projection_smollm2.json``."""
    rows = []
    for folder, (split, records) in LARGER_RUNS.items():
        trained_path = RESULTS / Path(folder).parent / "library_projection_smollm2.json"
        if not trained_path.exists():
            continue
        radii = _radii(json.loads(trained_path.read_text()))
        for run in sorted((RESULTS / folder).glob("e2e_*.json")):
            data = json.loads(run.read_text())
            for name, v in data["variants"].items():
                rows.append([split, records, data["model"], SHIPPED_VARIANTS.get(name, name), f"{radii[name]:.2f}",
                             str(v["edits"]), f3(v["es"]), f3(v["err"]),
                             f"{f2(v['gen_generate'])} / {f2(v['gen_rephrase'])}", f3(v["generate_routed_own"]),
                             f3(v["gen_generate_given_routed"]), f3(v["locality"]), f3(v["locality_clean"]),
                             f"{v['edit_cpu_seconds'] / max(1, v['edits']):.2f}"])
    if not rows:
        return ["(not run: no `results/all_b/` or `results/split1/first_200/`)"]
    return [table(["split", "part-B records", "model", "variant", "radius of the edits' keys", "edits (B)", "ES",
                   "ERR", "gen generate / rephrase", "routed own", "gen if routed", "locality", "locality clean",
                   "edit CPU s / edit"], rows)]


def paraphrase_radius_note() -> str:
    """How finely the held-out hard negatives resolve locality, and each split's radius beside its radius for 3
    paraphrases (``library_projection_<model>.json``, here and in ``split1/``)."""
    parts, negatives = [], None
    for label, folder in (("first split", RESULTS), ("second split", RESULTS / "split1")):
        for model in MODELS:
            path = folder / f"library_projection_{model}.json"
            if not path.exists():
                continue
            training = json.loads(path.read_text())["training"]
            worded = paraphrased(training)
            if 3 in worded:
                floor = " (the floor)" if worded[3].get("floor") else ""
                parts.append(f"{model} {label} {training['held_out']['radius']:.2f} → {worded[3]['radius']:.2f}{floor}")
                negatives = negatives or worded[3]["questions"]["negatives_few_edits"]
    if not parts:
        return "(not run)"
    return (f"It is judged on {negatives} held-out hard negatives (one question is {100 / negatives:.1f}% of them), "
            "so one or two questions can move it by a grid step or more. Radius → radius for 3 paraphrases, chosen on "
            f"each A: {'; '.join(parts)}.")


def before_floor_line() -> str:
    """MiniLM's second-split run with 3 paraphrases before the paraphrase radius had its floor
    (``results/split1/before_floor/``), beside the run since (``results/split1/``)."""
    runs = []
    for folder in (RESULTS / "split1" / "before_floor", RESULTS / "split1"):
        trained, run = folder / "library_projection_minilm.json", wordings_variants(folder, "minilm").get("kp_para3")
        if not trained.exists() or run is None:
            return "(not run)"
        worded = paraphrased(json.loads(trained.read_text())["training"])[3]
        runs.append((worded, run))
    return "; ".join(
        f"{label}: radius for 3 paraphrases {worded['radius']:.2f} (A held out: paraphrases routed "
        f"{f3(worded['paraphrases_routed'])}, negatives kept out {f3(worded['locality_negatives_few_edits'])}), on B "
        f"generality {f2(v['gen_generate'])} / {f2(v['gen_rephrase'])}, ERR {f3(v['err'])}, locality "
        f"{f3(v['locality'])} (clean {f3(v['locality_clean'])})"
        for label, (worded, v) in zip(("before the floor", "with the floor"), runs, strict=True))


def one_cluster_line() -> str:
    """MiniLM's 3-paraphrase run when an edit's wordings made one cluster around their mean (``results/one_cluster/``,
    the design rejected for its forgotten points), beside the shipped run (``e2e_minilm_wordings.json``)."""
    path = RESULTS / "one_cluster" / "e2e_minilm_kp_para3.json"
    shipped_run = wordings_variants(RESULTS, "minilm").get("kp_para3")
    if not path.exists() or shipped_run is None:
        return "(not run)"
    parts = []
    for label, v in (("one cluster per edit", json.loads(path.read_text())["variants"]["kp_para3"]),
                     ("a cluster per wording (shipped)", shipped_run)):
        parts.append(f"{label}: generality {f2(v['gen_generate'])} / {f2(v['gen_rephrase'])}, ERR {f3(v['err'])}, "
                     f"locality {f3(v['locality'])} (clean {f3(v['locality_clean'])}), "
                     f"{v['db']['forgotten_points']} points forgotten")
    return "; ".join(parts)


def main_job_line() -> str:
    """The SmolLM2 projection (trained on zsRE part A) on the main job's shipped everyday facts (``demo``)."""
    report = load("demo_smollm2_kp")
    if report is None:
        return "(not run: no `demo_smollm2_kp.json`)"
    parts = []
    for name in ("unedited", "melo"):
        m = report["methods"][name]["metrics"]
        parts.append(f"{name}: ES {f3(m['es'])}, ERR {f3(m['err'])}, generality {f2(m['generality_generate'])} / "
                     f"{f2(m['generality_rephrase'])}, locality {f3(m['locality'])}")
    conflicts = report["methods"]["melo"]["db"]["conflicts"]
    plain_path = HERE.parents[0] / "runs" / "smollm2_demo" / "demo_report.json"  # `make demo`'s run
    plain = "(not run)"
    if plain_path.exists():
        m = json.loads(plain_path.read_text())["methods"]["melo"]["metrics"]
        plain = (f"generality {f2(m['generality_generate'])} / {f2(m['generality_rephrase'])}, locality "
                 f"{f3(m['locality'])}")
    return (f"{'; '.join(parts)} ({report['edited']} edits; {conflicts} cluster conflicts at the projection's radius "
            f"{report['methods']['melo']['init_radius']:.2f}; MELO without a projection on the same facts, "
            f"`evaluation/runs/smollm2_demo`: {plain})")


# --- the conflict rule ----------------------------------------------------------------------------------


def _radii(trained: dict) -> dict[str, float]:
    """A library projection JSON's radius per variant (``kp``, ``kp_para<k>``)."""
    worded = paraphrased(trained["training"])
    return {"kp": trained["radius"], **{f"kp_para{k}": v["radius"] for k, v in worded.items()}}


def conflict_routing_lines() -> list[str]:
    """Routing alone on part B under each conflict rule (``voronoi/[split1/]conflict_rules_<model>.json``): the
    split at its radii, voronoi at the split's radii (the same scopes before conflicts), voronoi at its own."""
    rows = []
    for sub, split in SPLITS.items():
        for model in MODELS:
            path = RESULTS / VORONOI / sub / f"conflict_rules_{model}.json"
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            for m, name in (("0", "projection"), ("3", "projection + 3 paraphrases")):
                same = data["radii"]["split"][m] == data["radii"]["voronoi"][m]
                for rule, radii_of in (("split", "split"), ("voronoi", "split"), ("split", "voronoi"),
                                       ("voronoi", "voronoi")):
                    if same and radii_of == "voronoi":
                        continue  # one radius chosen under both rules: the rows above
                    p = data["results"][rule][m]["calibrated"][radii_of]
                    under = "both" if same else radii_of
                    rows.append([model, split, str(data["edits"]), name, rule, f"{p['radius_for'][m]:.2f} ({under})",
                                 f3(p["generate_routed_own"]), f3(p["generate_misrouted"]),
                                 f3(p["generate_reach_alone"]), f3(p["edit_routed_own"]), f3(p["locality_kept_out"]),
                                 f3(p["locality_clean_kept_out"]), str(p["forgotten_points"])])
    if not rows:
        return ["(not run: no `results/voronoi/conflict_rules_*.json`)"]
    return [table(["model", "split", "edits (B)", "variant", "rule", "radius (chosen on A under)",
                   "generate routed own", "misrouted", "within own radius alone", "edit prompts routed home",
                   "locality kept out", "clean kept out", "points forgotten"], rows)]


def conflict_e2e_lines() -> list[str]:
    """End to end with the voronoi projections (``voronoi/<folder>/e2e_*.json``) beside the same variant, records
    and split under MELO's split (``<folder>/e2e_<model>*.json``, later files replacing earlier ones)."""
    rows = []
    for relative, data, sub, records in _e2e_runs(VORONOI):
        model = data["model"]
        trained = {rule: folder / sub / f"library_projection_{model}.json"
                   for rule, folder in (("split", RESULTS), ("voronoi", RESULTS / VORONOI))}
        if not all(p.exists() for p in trained.values()):
            continue
        radii = {rule: _radii(json.loads(p.read_text())) for rule, p in trained.items()}
        before = {}
        for path in sorted((RESULTS / relative).glob(f"e2e_{model}*.json")):
            before.update(json.loads(path.read_text())["variants"])
        for name, v in data["variants"].items():
            for rule, w in (("split", before.get(name)), ("voronoi", v)):
                if w is None:
                    continue
                rows.append([model, SPLITS.get(sub, sub), records, SHIPPED_VARIANTS.get(name, name), rule,
                             f"{radii[rule][name]:.2f}", str(w["edits"]), f3(w["err"]),
                             f"{f2(w['gen_generate'])} / {f2(w['gen_rephrase'])}", f3(w["generate_routed_own"]),
                             f3(w["generate_misrouted"]), f3(w["gen_generate_given_routed"]), f3(w["locality"]),
                             f3(w["locality_clean"]), str(w["db"]["forgotten_points"])])
    if not rows:
        return ["(not run: no `results/voronoi/**/e2e_*.json`)"]
    return [table(["model", "split", "part-B records", "variant", "rule", "radius of the edits' keys", "edits (B)",
                   "ERR", "gen generate / rephrase", "routed own", "misrouted", "gen if routed", "locality",
                   "locality clean", "points forgotten"], rows)]


def stopped_by_lines(shown: int = 3, folder: str = VORONOI) -> list[str]:
    """Per projection of ``folder`` (``<folder>/[split1/]library_projection_<model>.json``) that records it
    (``info["held_out"]["stopped_by"]``): the radius chosen on A, the next one and the held-out questions it let
    in, the nearest ``shown`` of them with the edit wording each was taken for."""
    lines = []
    for sub, split in SPLITS.items():
        for model in MODELS:
            path = RESULTS / folder / sub / f"library_projection_{model}.json"
            trained = json.loads(path.read_text()) if path.exists() else {}
            stopped = trained.get("training", {}).get("held_out", {}).get("stopped_by")
            if not stopped or stopped["radius"] is None:
                continue
            let_in = stopped["let_in"]
            counts = ", ".join(
                f"{name} {let_in.get(f'{kind}_few_edits', 0)} / {let_in.get(f'{kind}_many_edits', 0)}"
                for kind, name in (("negatives", "hard negatives"), ("never_edited", "never-edited wordings"))
                if f"{kind}_few_edits" in let_in or f"{kind}_many_edits" in let_in)
            nearest = "; ".join(f"“{q['question']}” taken for “{q['nearest_edit_wording']}” ({q['distance']:.2f})"
                                for q in stopped["questions"][:shown])
            lines.append(f"- {MODEL_NAMES[model]}, {split} split: radius {trained['radius']:.2f}; at "
                         f"{stopped['radius']:.2f} the held-out folds let in {counts} (with few / many edits in "
                         f"the database). Nearest: {nearest}.")
    return lines


def conflict_ceiling_line() -> str:
    """Per model, split and paraphrases: the most generate prompts either rule routes home at clean locality ≥ 0.99
    over ``conflict_rules.py``'s radius grid on B (fitted on B: a ceiling, not a choice)."""
    parts, radii = [], set()
    for sub, split in SPLITS.items():
        for model in MODELS:
            path = RESULTS / VORONOI / sub / f"conflict_rules_{model}.json"
            if not path.exists():
                continue
            results = json.loads(path.read_text())["results"]
            radii |= {p["radius_for"]["0"] for p in results["split"]["0"]["grid"]}
            for m, name in (("0", "projection"), ("3", "3 paraphrases")):
                best = {}
                for rule in ("split", "voronoi"):
                    fit = [p for p in results[rule][m]["grid"] if p["locality_clean_kept_out"] >= 0.99]
                    top = max(fit, key=lambda p: p["generate_routed_own"], default=None)
                    best[rule] = ("–" if top is None
                                  else f"{f3(top['generate_routed_own'])} ({top['radius_for'][m]:.2f})")
                parts.append(f"{model} {split} split, {name}: split {best['split']}, voronoi {best['voronoi']}")
    if not parts:
        return "(not run: no `results/voronoi/conflict_rules_*.json`)"
    return (f"The most held-out generate prompts routed home at clean locality ≥ 0.99 on B, over radii "
            f"{min(radii):.2f} to {max(radii):.2f} (fitted on B itself: each rule's ceiling, not a choice; "
            "rule (radius)): "
            + "; ".join(parts) + ".")


# --- negatives with a neighbouring number (train_key_projection(number_negatives=True)) ---------------------
# Each numbers projection beside the voronoi one it follows (same rule and facts; the facts' own negatives only):
# (folder, file suffix, what changed).
NUMBER_PROJECTIONS = ((VORONOI, "", "the facts' own negatives"), (NUMBERS, "_up3", "+ number negatives"),
                      (NUMBERS, "", "+ number negatives"))


def _key_function(trained: dict) -> str:
    return f"`{trained['router']}` ({trained['key_position']})"


HALF_PROJECTIONS = ((NUMBERS, "", "the edited half"), (HALVES, "", "both halves"))
HALVES_E2E = ((NUMBERS, "the edited half"), (HALVES, "both halves"), "radius judged on")  # compared_e2e_lines' args


def routing_lines(projections=NUMBER_PROJECTIONS, label: str = "training negatives") -> list[str]:
    """Per model and split, each of ``projections`` (``(folder, suffix, what sets it apart)``:
    ``<folder>/[split1/]library_projection_<model><suffix>.json`` and ``conflict_rules_<model><suffix>.json``): what
    A's held-out folds showed and chose, and where part B's questions go at those radii (voronoi rule)."""
    rows = []
    for sub, split in SPLITS.items():
        for model in MODELS:
            for folder, suffix, apart in projections:
                trained_path = RESULTS / folder / sub / f"library_projection_{model}{suffix}.json"
                routed_path = RESULTS / folder / sub / f"conflict_rules_{model}{suffix}.json"
                if not (trained_path.exists() and routed_path.exists()):
                    continue
                trained, routed = json.loads(trained_path.read_text()), json.loads(routed_path.read_text())
                held = trained["training"]["held_out"]
                worded = paraphrased(trained["training"])[3]
                on_b = {m: routed["results"]["voronoi"][m]["calibrated"]["voronoi"] for m in ("0", "3")}
                rows.append([
                    model, split, _key_function(trained), apart,
                    f"{trained['radius']:.2f}; {worded['radius']:.2f}",
                    f"{held['questions']['negatives_many_edits']} / {held['questions']['never_edited_many_edits']}",
                    f"{f3(held['locality_negatives_many_edits'])} / {f3(held['locality_never_edited_many_edits'])}",
                    f"{f3(held['paraphrases_routed'])} / {f3(worded['paraphrases_routed'])}",
                    " / ".join(f3(on_b[m]["generate_routed_own"]) for m in on_b),
                    " / ".join(f3(on_b[m]["generate_misrouted"]) for m in on_b),
                    " / ".join(f3(on_b[m]["locality_kept_out"]) for m in on_b),
                    " / ".join(f3(on_b[m]["locality_clean_kept_out"]) for m in on_b)])
    if not rows:
        return [f"(not run: no `library_projection_*.json` in `results/{projections[-1][0]}/`)"]
    return [table(["model", "split", "key function", label, "radius; with 3 paraphrases (chosen on A)",
                   "A held out: questions judged (negatives / never edited)",
                   "A held out, many edits: kept out (negatives / never edited)",
                   "A held out: paraphrases routed (0 / 3 given)", "B: generate routed own (0 / 3 given)",
                   "B: misrouted (0 / 3)", "B: locality kept out (0 / 3)", "B: clean kept out (0 / 3)"], rows)]


def compared_e2e_lines(before: tuple[str, str] = (VORONOI, "the facts' own negatives"),
                       after: tuple[str, str] = (NUMBERS, "+ number negatives"),
                       label: str = "training negatives") -> list[str]:
    """End to end with the projections of one results folder (``after``: ``(folder, what sets it apart)``;
    ``<folder>/**/e2e_*.json``), each beside the same variant, split and records with the projections of another
    (``before``; ``<folder>/<same subfolder>/e2e_<model>*.json``), where that one was run."""
    rows = []
    for relative, data, sub, records in _e2e_runs(after[0]):
        model = data["model"]
        trained = {apart: json.loads((RESULTS / folder / sub / f"library_projection_{model}.json").read_text())
                   for folder, apart in (before, after)}
        earlier = {}
        for path in sorted((RESULTS / before[0] / relative).glob(f"e2e_{model}*.json")):
            earlier.update(json.loads(path.read_text())["variants"])
        for name, v in data["variants"].items():
            for (apart, projection), w in zip(trained.items(), (earlier.get(name), v), strict=True):
                if w is None:
                    continue
                rows.append([model, SPLITS.get(sub, sub), records, SHIPPED_VARIANTS.get(name, name),
                             _key_function(projection), apart, f"{_radii(projection)[name]:.2f}", str(w["edits"]),
                             f3(w["es"]), f3(w["err"]), f"{f2(w['gen_generate'])} / {f2(w['gen_rephrase'])}",
                             f3(w["generate_routed_own"]), f3(w["generate_misrouted"]),
                             f3(w["gen_generate_given_routed"]), f3(w["locality"]), f3(w["locality_clean"]),
                             f"{w['edit_cpu_seconds'] / w['edits']:.2f}"])
    if not rows:
        return [f"(not run: no `results/{after[0]}/**/e2e_*.json`)"]
    return [table(["model", "split", "part-B records", "variant", "key function", label,
                   "radius of the edits' keys", "edits (B)", "ES", "ERR", "gen generate / rephrase", "routed own",
                   "misrouted", "gen if routed", "locality", "locality clean", "edit CPU s / edit"], rows)]


def _half_pairs():
    """Each (model, split subfolder, edited-half projection JSON, both-halves projection JSON) with both in
    ``numbers/`` and ``halves/`` (``[split1/]library_projection_<model>.json``)."""
    for sub in SPLITS:
        for model in MODELS:
            paths = [RESULTS / folder / sub / f"library_projection_{model}.json" for folder in (NUMBERS, HALVES)]
            if all(p.exists() for p in paths):
                yield model, sub, *(json.loads(p.read_text()) for p in paths)


def _unchanged_radii() -> dict[tuple[str, str], list[str]] | None:
    """Per (model, split subfolder) of :func:`_half_pairs`, the variants (``kp``, ``kp_para<k>``) whose radius
    came out the same on both halves as on the edited half; None: no such pair."""
    unchanged = None
    for model, sub, before, after in _half_pairs():
        unchanged = unchanged or {}
        unchanged[model, sub] = [name for name, radius in _radii(after).items() if _radii(before)[name] == radius]
    return unchanged


def unchanged_radii_line() -> str:
    """The radii that came out the same on both halves as on the edited half (:func:`_unchanged_radii`): runs at
    them with the number-negative projection are those of the both-halves one, since the map is trained the same
    way."""
    unchanged = _unchanged_radii()
    if unchanged is None:
        return f"(not run: no `library_projection_*.json` in `results/{HALVES}/`)"
    same = [f"{MODEL_NAMES[model]} {SPLITS[sub]} split ({', '.join(SHIPPED_VARIANTS.get(n, n) for n in names)})"
            for (model, sub), names in unchanged.items() if names]
    if not same:
        return "Every radius changed on both halves."
    return ("The same radius on both halves as on the edited half: " + "; ".join(same) + ". Judging the radius does "
            "not touch training, so at those radii the maps and scopes are the number-negative projection's, and so "
            "are its runs above.")


def halves_cost_line() -> str:
    """What judging the radius on both halves cost: each both-halves projection's training seconds over the
    edited-half one's (:func:`_half_pairs`)."""
    ratios = [after["training"]["seconds"] / before["training"]["seconds"] for _, _, before, after in _half_pairs()]
    if not ratios:
        return f"(not run: no `library_projection_*.json` in `results/{HALVES}/`)"
    return (f"Training a projection (the maps, then the radii) took {min(ratios):.2f}–{max(ratios):.2f}× as long as "
            "with the edited half only (one thread each, beside other jobs on this machine).")


def halves_intro() -> str:
    """The paragraph that opens "Both halves judge the radius" in both reports, ending at its routing table."""
    return ("A's held-out folds judged the radius on the hard negatives of the edited half of each fold's facts only "
            "(the first row of each pair below, \"questions judged\"): a few hundred, so one question moved the "
            "chosen radius a grid step. `train_key_projection` now edits each half of every fold in turn and counts "
            "both (`_Half` in `melo_fast/editing/key_projection_training.py`): every held-out fact's negatives and "
            f"wordings judge the radius. The maps are trained as before. {halves_cost_line()} Routing alone on part B "
            f"at the radii each calibration chose (voronoi rule; `results/{HALVES}/`):")


def target_line() -> str:
    """Issue 22's target (generate and rephrase generality ≥ :data:`TARGET_GENERALITY` at clean locality ≥
    :data:`TARGET_LOCALITY`) per model, split and variant, on the latest runs: ``halves/``, and ``numbers/`` at the
    radii both halves chose again (the same map and radius, so the same run)."""
    unchanged = _unchanged_radii() or {}
    latest = {}
    for folder in (NUMBERS, HALVES):  # later folders replace earlier ones
        for _, data, sub, records in _e2e_runs(folder):
            for name, v in data["variants"].items():
                if folder == HALVES or name in unchanged.get((data["model"], sub), ()):
                    latest[data["model"], sub, name] = (records, v)
    parts = []
    for (model, sub, name), (records, v) in sorted(latest.items()):
        met = min(v["gen_generate"], v["gen_rephrase"]) >= TARGET_GENERALITY and v["locality_clean"] >= TARGET_LOCALITY
        parts.append(f"{MODEL_NAMES[model]} {SPLITS[sub]} split ({records} of B), {SHIPPED_VARIANTS.get(name, name)}: "
                     f"{f2(v['gen_generate'])} / {f2(v['gen_rephrase'])} at clean locality {f3(v['locality_clean'])} "
                     f"(raw {f3(v['locality'])}), {'met' if met else 'missed'}")
    if not parts:
        return f"(not run: no `results/{HALVES}/**/e2e_*.json`)"
    return (f"Against the target (generate and rephrase generality ≥ {TARGET_GENERALITY} at clean locality ≥ "
            f"{TARGET_LOCALITY}), with the projections trained now: " + "; ".join(parts) + ".")


def numbers_equal_radius_line(around: float = 0.04) -> str:
    """Per numbers map (``numbers/[split1/]conflict_rules_<model>[_up3].json``) against the voronoi map of its model
    and split, at equal radius on B (voronoi rule, 3 paraphrases per edit): the mean difference in generate prompts
    routed home and in clean locality kept out, over the grid radii within ``around`` of the radii either chose on
    A. Tells a better map from a radius chosen elsewhere."""
    parts = []
    for sub, split in SPLITS.items():
        for model in MODELS:
            before_path = RESULTS / VORONOI / sub / f"conflict_rules_{model}.json"
            for suffix in ("_up3", ""):
                after_path = RESULTS / NUMBERS / sub / f"conflict_rules_{model}{suffix}.json"
                trained_path = RESULTS / NUMBERS / sub / f"library_projection_{model}{suffix}.json"
                if not (before_path.exists() and after_path.exists() and trained_path.exists()):
                    continue
                runs = [json.loads(path.read_text()) for path in (before_path, after_path)]
                chosen = [run["radii"]["voronoi"]["3"] for run in runs]
                before, after = ({round(p["radius_for"]["3"], 2): p for p in run["results"]["voronoi"]["3"]["grid"]
                                  if min(chosen) - around <= p["radius_for"]["3"] <= max(chosen) + around}
                                 for run in runs)
                radii = sorted(set(before) & set(after))
                routed = sum(after[r]["generate_routed_own"] - before[r]["generate_routed_own"] for r in radii)
                clean = sum(after[r]["locality_clean_kept_out"] - before[r]["locality_clean_kept_out"] for r in radii)
                router = json.loads(trained_path.read_text())["router"]
                parts.append(f"{MODEL_NAMES[model]} {split} split (`{router}`, radii {radii[0]:.2f}–{radii[-1]:.2f}): "
                             f"{routed / len(radii):+.3f} routed, {clean / len(radii):+.3f} clean locality")
    if not parts:
        return "(not run: no pair of `conflict_rules_<model>.json` in `results/voronoi/` and `results/numbers/`)"
    return ("At equal radius on B (3 paraphrases per edit, voronoi rule, the grid radii within "
            f"{around:.2f} of those both maps chose on A), each map trained with number negatives against the voronoi "
            "map of its model and split, on average over those radii: " + "; ".join(parts) + ". Where the radius "
            "chosen on A moves more than the map does, the difference in the table above is the radius's: A's "
            "held-out hard negatives number 360, so one question moves the chosen radius a grid step.")
