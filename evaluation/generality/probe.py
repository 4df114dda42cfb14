"""The routing-bound probe: how much generality a key function can reach at a given locality.

    python evaluation/generality/probe.py --model smollm2 --out evaluation/generality/results/probe_smollm2.json
    python evaluation/generality/probe.py --model minilm --paraphrases 0,1,3 --specs default ...

No block is trained: the probe builds MELO's real database (``melo_fast.vecdb.VectorDatabase``, the
library's insert and search, so conflicts, splits, merges and paraphrases joining a cluster behave
exactly as when editing) from the keys of the edit batches, and asks where every probe question is
routed. A question "reaches" its edit when it is routed to the block that was trained on its edit;
that is an upper bound on generality (the block must still give the new answer) and, for locality, a
lower bound (a question routed to a block may still keep its answer). Per part of the split
(``common.load_parts``) and per key function:

- edits: the part's edited records in sequential batches of 10 (one block each), each edit inserted
  with its prompt and ``m`` user paraphrases (``generate_prompt[:m]``);
- generality: ``rephrase_prompt`` and the held-out ``generate_prompt[3:]`` of the edited records;
- locality: the Relation_Specificity questions of every record of the part (``relation``) and the
  prompt + rephrase of its never-edited records (``unedited``), which must be routed to no block;
- misroute: a generality question routed to *another* block (the failure a larger radius brings);
- ERR bound: edited prompts that reach their own block after all batches (conflict splits can lose them).

The radius is swept as a multiple of the key scale (``melo_fast.editing.calibration``: the median distance
between the keys of the built-in neutral prompts), i.e. as ``MeloConfig.relative_radius``, so a
value found here is a setting the library can ship. For each locality floor (0.99, 0.98) the summary
gives the best generality on that part (a best case: the radius is chosen on the part itself) and,
for part B, the generality at the radius chosen on part A (what a shipped setting would give). For a
projected key function the radius is chosen on the 20% of A's subjects the projection did not train on
(``A_val``, stored as part "A" with ``fit_part``), since its training records look unrealistically local.

Key functions (``common.spec_names``): a router module of some layer, the last real token or the
mean over real tokens, Euclidean (``l2``) or cosine (``cos``: keys scaled to unit norm, then
Euclidean, which ranks as cosine does), optionally through a trained projection (``--projection``,
see ``projection.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluation.generality import common  # noqa: E402
from melo_fast.editing import calibration  # noqa: E402
from melo_fast.editing.calibration import NEUTRAL_PROMPTS  # noqa: E402
from melo_fast.vecdb import COINCIDE_FRACTION, VectorDatabase, coinciding_conflicts  # noqa: E402

BATCH = 10
FLOORS = (0.99, 0.98)
# Relative radii swept (× key scale): geometric, dense enough that neighbouring points differ by 12%.
RADII = tuple(round(0.02 * 1.12**i, 5) for i in range(40))  # 0.02 … 1.67


class KeyFunction:
    """Texts → keys: cached router keys, optionally projected, optionally scaled to unit norm."""

    def __init__(self, store: common.KeyStore, spec: str, metric: str = "l2", projection=None):
        if metric not in ("l2", "cos"):
            raise ValueError(f"metric must be l2 or cos, got {metric!r}")
        self.store, self.spec, self.metric, self.projection = store, spec, metric, projection

    def __call__(self, texts: list[str]) -> torch.Tensor:
        keys = self.store.get(self.spec, texts)
        if self.projection is not None:
            with torch.no_grad():
                keys = self.projection(keys)
        if self.metric == "cos":
            keys = torch.nn.functional.normalize(keys, dim=-1)
        return keys

    @property
    def name(self) -> str:
        projected = "" if self.projection is None else "+proj"
        return f"{self.spec}/{self.metric}{projected}"


class RoutingProblem:
    """One part's edit batches and probe questions under one key function, ready to sweep radii."""

    def __init__(self, records, keys: KeyFunction, paraphrases: int = 0):
        edited, held = common.edited_and_held(records)
        self.edited, self.held, self.paraphrases = edited, held, paraphrases
        self.key_scale = calibration.key_scale(keys(list(NEUTRAL_PROMPTS)))
        label_of: dict[str, int] = {}
        block_of = [i // BATCH for i in range(len(edited))]
        self.batches = []  # (keys [n, d], labels) per block
        for b in range(0, len(edited), BATCH):
            texts, labels = [], []
            for r in edited[b : b + BATCH]:
                label = (label_of.setdefault(r.target_new, len(label_of)),)
                for text in [r.prompt, *common.given_paraphrases(r, paraphrases)]:
                    texts.append(text)
                    labels.append(label)
            self.batches.append((keys(texts), labels))
        # Probe questions: (set name, keys, the block each must reach, -1 for locality).
        sets = {
            "edit": ([r.prompt for r in edited], block_of),
            "rephrase": ([r.rephrase_prompt for r in edited], block_of),
            "generate": (
                [g for r in edited for g in common.heldout_generate(r)],
                [block_of[i] for i, r in enumerate(edited) for _ in common.heldout_generate(r)],
            ),
            "relation": ([p.prompt for r in edited + held for p in common.relation_probes(r)], None),
            "unedited": ([r.prompt for r in held] + [r.rephrase_prompt for r in held], None),
        }
        self.sets = {}
        for name, (texts, expected) in sets.items():
            expected = torch.full((len(texts),), -1) if expected is None else torch.tensor(expected)
            self.sets[name] = (keys(texts), expected)
        # Locality questions that ask an edited fact in other words (common.same_fact): kept in raw
        # locality, left out of clean locality.
        self.same_fact = {
            "relation": torch.tensor([common.same_fact(r.subject, p.ground_truth, edited)
                                      for r in edited + held for p in common.relation_probes(r)], dtype=torch.bool),
            "unedited": torch.tensor([common.same_fact(r.subject, r.ground_truth, edited) for r in held] * 2,
                                     dtype=torch.bool),
        }
        self.dim = self.batches[0][0].shape[1]

    def build(self, relative_radius: float) -> VectorDatabase:
        """The database after every edit batch, with ``init_radius = relative_radius × key scale``."""
        db = VectorDatabase(self.dim, init_radius=relative_radius * self.key_scale, key_scale=self.key_scale)
        self.dropped = 0
        for block, (keys, labels) in enumerate(self.batches):
            # The editor refuses a batch with two rows that coincide (within a tenth of the radius) but ask
            # different targets: such a row (a duplicated question, a paraphrase equal to another edit's)
            # is left out, as a user would have to.
            drop = {j for _, j in coinciding_conflicts(keys, labels, COINCIDE_FRACTION * db.init_radius)}
            if drop:
                keep = [i for i in range(len(labels)) if i not in drop]
                keys, labels = keys[keep], [labels[i] for i in keep]
                self.dropped += len(drop)
            db.insert(keys, labels, block)
        return db

    def evaluate(self, relative_radius: float) -> dict:
        """Routing metrics at one radius (see the module docstring)."""
        db = self.build(relative_radius)
        out = {"relative_radius": relative_radius, "init_radius": relative_radius * self.key_scale}
        for name, (keys, expected) in self.sets.items():
            routed = db.search(keys) if len(keys) else torch.empty(0, dtype=torch.int64)
            if name in ("relation", "unedited"):
                kept = routed == -1
                out[f"loc_{name}"] = _mean(kept)
                out[f"loc_{name}_clean"] = _mean(kept[~self.same_fact[name]])
                out[f"same_fact_{name}_routed"] = _mean(~kept[self.same_fact[name]])
            else:
                out[name] = _mean(routed == expected)
                out[f"{name}_misroute"] = _mean((routed != expected) & (routed != -1))
        n_rel, n_une = len(self.sets["relation"][0]), len(self.sets["unedited"][0])
        out["locality"] = (out["loc_relation"] * n_rel + out["loc_unedited"] * n_une) / (n_rel + n_une)
        c_rel, c_une = (int((~self.same_fact[n]).sum()) for n in ("relation", "unedited"))
        clean_kept = out["loc_relation_clean"] * c_rel + out["loc_unedited_clean"] * c_une
        out["locality_clean"] = clean_kept / (c_rel + c_une)
        stats = db.stats()
        out["rows_dropped"] = self.dropped
        out.update(conflicts=stats["conflicts"], forgotten=stats["forgotten_points"], clusters=stats["clusters"])
        return out

    def nearest_neighbour(self) -> dict:
        """Share of generality questions whose nearest stored key belongs to their own block: the ceiling of
        any radius rule in this key space (no radius can route a question past a nearer key of another block)."""
        stored = torch.cat([k for k, _ in self.batches])
        owner = torch.cat([torch.full((len(k),), b) for b, (k, _) in enumerate(self.batches)])
        out = {}
        for name in ("rephrase", "generate"):
            keys, expected = self.sets[name]
            nearest = torch.cdist(keys, stored).argmin(1)
            out[f"nn_{name}"] = _mean(owner[nearest] == expected)
        return out

    def describe(self) -> dict:
        return {
            "records": len(self.edited) + len(self.held),
            "edited": len(self.edited),
            "never_edited": len(self.held),
            "batches": len(self.batches),
            "paraphrases_per_edit": self.paraphrases,
            "keys_inserted": sum(len(k) for k, _ in self.batches),
            "questions": {name: len(keys) for name, (keys, _) in self.sets.items()},
            "same_fact_locality_questions": {name: int(mask.sum()) for name, mask in self.same_fact.items()},
            "key_scale": self.key_scale,
        }


def _mean(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else math.nan


def best_at(points: list[dict], floor: float, locality: str = "locality", metric: str = "generate") -> dict | None:
    """The sweep point with the best ``metric`` among those with ``locality`` >= floor (ties: larger rephrase)."""
    eligible = [p for p in points if p[locality] >= floor]
    if not eligible:
        return None
    return max(eligible, key=lambda p: (p[metric], p["rephrase"], -p["relative_radius"]))


def sweep(problem: RoutingProblem, radii=RADII) -> list[dict]:
    """Every radius of ``radii``; stops early once even clean locality has fallen well below the lowest floor."""
    points = []
    for r in radii:
        points.append(problem.evaluate(r))
        if points[-1]["locality_clean"] < min(FLOORS) - 0.05:
            break
    return points


LOCALITIES = ("locality", "locality_clean")


def summarize(points: list[dict], chosen: dict | None = None) -> dict:
    """Best generality per locality kind (raw, clean) and floor; with ``chosen`` (part A's radius for each)
    also the point at that radius."""
    out = {}
    for locality in LOCALITIES:
        for floor in FLOORS:
            name = f"{locality}>={floor}"
            entry = {"best": best_at(points, floor, locality)}
            if chosen is not None and chosen.get(name) is not None:
                r = chosen[name]
                at = min(points, key=lambda p: abs(p["relative_radius"] - r))
                # None: the sweep stopped before A's radius (locality far too low there).
                entry["at_A_radius"] = at if abs(at["relative_radius"] - r) < 1e-9 else None
            out[name] = entry
    return out


def _rounded(point: dict | None) -> dict | None:
    if point is None:
        return None
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()}


def probe(store: common.KeyStore, parts: dict, spec: str, metric: str, paraphrases: int, projection=None,
          keep_sweep: bool = True) -> dict:
    """The probe of one key function on parts A and B (B also at A's radii)."""
    keys = KeyFunction(store, spec, metric, projection)
    result = {"key_function": keys.name, "spec": spec, "metric": metric, "paraphrases": paraphrases,
              "projection": projection is not None}
    chosen = None
    # A projection's radius is chosen on A's subjects it did not train on (common.projection_split).
    fit = common.projection_split(parts["A"])[1] if projection is not None else parts["A"]
    result["fit_part"] = "A_val" if projection is not None else "A"
    for part in ("A", "B"):
        start = time.perf_counter()
        problem = RoutingProblem(fit if part == "A" else parts[part], keys, paraphrases)
        points = sweep(problem)
        summary = summarize(points, chosen)
        if part == "A":
            chosen = {f: (s["best"] or {}).get("relative_radius") for f, s in summary.items()}
        summary = {name: {k: _rounded(p) for k, p in entry.items()} for name, entry in summary.items()}
        result[part] = {**problem.describe(), **problem.nearest_neighbour(), "summary": summary,
                        "sweep": [_rounded(p) for p in points] if keep_sweep else None,
                        "seconds": time.perf_counter() - start}
    return result


def line(result: dict) -> str:
    """One console line: generate/rephrase generality, best on A, and on B at A's radius, per floor."""
    cells = [f"{result['key_function']:<30} m={result['paraphrases']} nnB {result['B']['nn_generate']:.2f}"]
    for name in result["A"]["summary"]:
        a = result["A"]["summary"][name]["best"]
        b = result["B"]["summary"][name]
        fmt = lambda p: " -/- " if not p else f"{p['generate']:.2f}/{p['rephrase']:.2f}"  # noqa: E731
        short = name.replace("locality_clean", "clean").replace("locality", "raw")
        cells.append(f"{short}: A {fmt(a)} B@A {fmt(b.get('at_A_radius'))}")
    return " | ".join(cells)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), required=True)
    parser.add_argument("--specs", default="all",
                        help="'all' (every cached key function) or a comma list of <module>@<layer>:<position> "
                             "('default': the library's router, last token)")
    parser.add_argument("--metrics", default="l2,cos")
    parser.add_argument("--paraphrases", default="0", help="comma list of user paraphrases per edit (0..3)")
    parser.add_argument("--projection", default=None, help="a projection saved by projection.py (applied to its spec)")
    parser.add_argument("--no-sweeps", action="store_true", help="keep only the summaries (smaller JSON)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    parts = common.load_parts()
    store = common.KeyStore(args.model)
    projection = None
    if args.projection:
        from evaluation.generality.projection import load_projection

        projection, spec = load_projection(args.projection)
        specs = [spec]
    elif args.specs == "all":
        specs = common.spec_names(args.model)
    else:
        default = f"{common.DEFAULT_ROUTER[args.model]}:last"
        specs = [default if s.strip() == "default" else s.strip() for s in args.specs.split(",") if s.strip()]
    results = []
    for spec in specs:
        for metric in args.metrics.split(","):
            for m in (int(x) for x in args.paraphrases.split(",")):
                results.append(probe(store, parts, spec, metric, m, projection, keep_sweep=not args.no_sweeps))
                print(line(results[-1]), flush=True)
    report = {
        "script": "evaluation/generality/probe.py",
        "command": "python evaluation/generality/probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "provenance": common.provenance(),
        "model": args.model,
        "split": {"seed": common.SEED, "parts": {p: len(r) for p, r in parts.items()}},
        "key_extraction": store.extraction_seconds(),
        "radii": list(RADII),
        "floors": list(FLOORS),
        "results": results,
        "total_seconds": time.perf_counter() - start,
    }
    common.write_json(Path(args.out), report)
    return report


if __name__ == "__main__":
    main()
