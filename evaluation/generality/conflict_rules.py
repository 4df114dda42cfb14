"""Routing alone, under MELO's conflict split and under the voronoi rule, on part B: where do paraphrases go?

    python evaluation/generality/conflict_rules.py --model smollm2 \
        --split-projection /tmp/melo_generality/kp_smollm2.safetensors \
        --voronoi-projection /tmp/melo_generality/vor/kp_smollm2.safetensors \
        --out evaluation/generality/results/voronoi/conflict_rules_smollm2.json

The two projections are one trained map (the same seed and facts give the same weights; checked) whose
radii were chosen on part A under each rule (``library_projection.py --conflict-rule``). No block is
trained: routing depends on the keys alone, so the database is built from part B's edit rows exactly as
``e2e.py`` inserts them (batches of 10, the prompt and ``m`` user paraphrases per edit, each with the
projection's radius for ``m``), and every question is searched. For each rule, ``m`` in (0, 3) and radius
(the grid, and each projection's own radii), the shares of:

- held-out generate prompts (and rephrases) routed to their own edit's block, to another's, to none;
- generate prompts within their own edit's radius of one of its rows, all other edits ignored
  (``reach_alone``): what the rule could route if no other edit were there;
- edit prompts routed to their own block (ERR's routing half);
- locality questions kept out of every scope, raw and without those that ask an edited fact (clean).

A share routed says nothing of the answer: ``e2e.py`` measures that, with trained blocks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import melo_fast  # noqa: E402
from evaluation.generality import common  # noqa: E402
from evaluation.generality.e2e import KP_GRID, GeneralityEval, build_task, edit_rows, edit_texts  # noqa: E402
from melo_fast.eval.harness import Settings  # noqa: E402
from melo_fast.vecdb import COINCIDE_FRACTION, VectorDatabase, coinciding_conflicts  # noqa: E402
from melo_fast.vecdb.wordings import wording_radii  # noqa: E402

RULES = ("split", "voronoi")
PARAPHRASES = (0, 3)


def edit_keys(harness, editor, paraphrases: int) -> list[tuple[torch.Tensor, list, list[int]]]:
    """Per batch of part B: ``(keys, labels, paraphrase_of)`` of its rows (prompt + ``paraphrases`` each),
    rows coinciding with another target dropped as ``e2e.edit_group`` drops them."""
    out = []
    for records in harness.batches:
        texts, targets, record_of = edit_texts(records, paraphrases)
        batch = edit_rows(harness.task, texts, targets)
        keys, labels = editor.keys(batch), [tuple(t) for t in editor.edit_batch(batch).targets]
        drop = {j for _, j in coinciding_conflicts(keys, labels, COINCIDE_FRACTION * editor.db.init_radius)}
        keep = [i for i in range(len(texts)) if i not in drop]
        record_of = [record_of[i] for i in keep]
        out.append((keys[keep], [labels[i] for i in keep], [record_of.index(k) for k in record_of]))
    return out


def routing(harness, batches, questions: dict, rule: str, radius_for) -> dict:
    """Build the database of ``batches`` under ``rule`` (radius of an edit with ``k`` paraphrases:
    ``radius_for(k)``) and measure where the questions go."""
    database = VectorDatabase(questions["generate"].shape[1], radius_for(0), conflict_rule=rule)
    for block, (keys, labels, paraphrase_of) in enumerate(batches):
        database.insert(keys, labels, block, radii=wording_radii(paraphrase_of, radius_for))
    edit_block = [b for b, records in enumerate(harness.batches) for _ in records]
    out = {}
    for name, owners in (("edit", range(len(harness.edited))), ("rephrase", range(len(harness.edited))),
                         ("generate", harness.sets["generate"].owners)):
        found = database.search(questions[name]).tolist()
        own = [edit_block[o] for o in owners]
        out[f"{name}_routed_own"] = sum(b == e for b, e in zip(found, own, strict=True)) / len(own)
        out[f"{name}_misrouted"] = sum(b >= 0 and b != e for b, e in zip(found, own, strict=True)) / len(own)
    # Reach alone: within the radius of one of its own edit's rows, every other edit ignored.
    rows = torch.cat([keys for keys, _, _ in batches])
    row_block = torch.tensor([b for b, (keys, _, _) in enumerate(batches) for _ in range(len(keys))])
    row_radius = torch.tensor([r for _, _, paraphrase_of in batches for r in wording_radii(paraphrase_of, radius_for)])
    own = torch.tensor([edit_block[o] for o in harness.sets["generate"].owners])
    within = (torch.cdist(questions["generate"], rows) <= row_radius) & (own[:, None] == row_block[None, :])
    out["generate_reach_alone"] = within.any(1).float().mean().item()
    kept, kept_clean, total, total_clean = 0, 0, 0, 0
    for name in ("locality_relation", "locality_unedited"):
        out_of_scope = (database.search(questions[name]) < 0).tolist()
        same = harness.same_fact[name]
        kept += sum(out_of_scope)
        total += len(out_of_scope)
        kept_clean += sum(k for k, s in zip(out_of_scope, same, strict=True) if not s)
        total_clean += sum(not s for s in same)
    out["locality_kept_out"], out["locality_clean_kept_out"] = kept / total, kept_clean / total_clean
    return {"radius_for": {k: radius_for(k) for k in PARAPHRASES}, **{k: round(v, 4) for k, v in out.items()},
            **database.stats()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), required=True)
    parser.add_argument("--split-projection", required=True, help="the projection with radii chosen under the split")
    parser.add_argument("--voronoi-projection", required=True, help="the same map with radii chosen under voronoi")
    parser.add_argument("--split-seed", type=int, default=common.SEED)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    projections = {"split": melo_fast.KeyProjection.load(args.split_projection),
                   "voronoi": melo_fast.KeyProjection.load(args.voronoi_projection)}
    if not all(torch.equal(a, b) for a, b in zip(*(p.tensors().values() for p in projections.values()), strict=True)):
        raise SystemExit("the two projections are different maps: train them with the same seed on the same facts")
    records = common.load_parts(seed=args.split_seed)["B"]
    task, config = build_task(args.model, records)
    harness = GeneralityEval(task, records, Settings(batch_size=10, holdout=common.HOLDOUT, progress=False))
    projection = projections["voronoi"]
    config = config.replace(router=projection.router, key_position=projection.key_position)
    editor = melo_fast.patch(task.model, config, tokenizer=task.tokenizer, key_projection=projection)
    try:
        editor.calibrate(task.tokenizer)
        questions = {name: harness.answerer.keys(name, editor)
                     for name in ("edit", "rephrase", "generate", "locality_relation", "locality_unedited")}
        batches = {m: edit_keys(harness, editor, m) for m in PARAPHRASES}
    finally:
        melo_fast.unpatch(task.model)
    results = {rule: {str(m): {"grid": [], "calibrated": {}} for m in PARAPHRASES} for rule in RULES}
    for rule in RULES:
        for m in PARAPHRASES:
            here = results[rule][str(m)]
            for radius in KP_GRID:
                here["grid"].append(routing(harness, batches[m], questions, rule, lambda k, r=radius: r))
            for chosen_under, chosen in projections.items():
                here["calibrated"][chosen_under] = routing(harness, batches[m], questions, rule, chosen.radius_for)
    common.write_json(Path(args.out), {
        "script": "evaluation/generality/conflict_rules.py",
        "command": "python evaluation/generality/conflict_rules.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "provenance": common.provenance(),
        "model": args.model,
        "split_seed": args.split_seed,
        "edits": len(harness.edited),
        "questions": {name: len(keys) for name, keys in questions.items()},
        "radii": {rule: {str(k): p.radius_for(k) for k in range(4)} for rule, p in projections.items()},
        "results": results,
        "total_seconds": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
