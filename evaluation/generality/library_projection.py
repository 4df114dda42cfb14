"""The shipped key projection (``melo_fast.train_key_projection``) trained on part A of the split.

    python evaluation/generality/library_projection.py --model smollm2 --router model.layers.3.mlp.up_proj \
        --key-position mean --save /tmp/melo_generality/kp_smollm2.safetensors \
        --out evaluation/generality/results/library_projection_smollm2.json

The facts are ``melo_fast.eval.paraphrase_facts.facts_from_records`` of part A (part B, where the
end-to-end runs report, is never read). The library holds a fifth of A's subjects out of training to
choose the step count and the radius. The projection file is kept out of the repository; the JSON
records what training reported (``KeyProjection.info``), the command and the commit.
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
from evaluation.generality.e2e import build_task  # noqa: E402
from melo_fast.eval.paraphrase_facts import facts_from_records  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), required=True)
    parser.add_argument("--router", default=None, help="router module (default: the run's default router)")
    parser.add_argument("--key-position", default="last", choices=("last", "mean"))
    parser.add_argument("--save", required=True, help="where the projection goes (kept out of the repository)")
    parser.add_argument("--split-seed", type=int, default=common.SEED,
                        help="seed of the by-subject split into parts A and B (another seed: another split)")
    parser.add_argument("--conflict-rule", default="voronoi", choices=("voronoi", "split"),
                        help="the database rule the radii are chosen under (train_key_projection's conflict_rule)")
    parser.add_argument("--out", required=True, help="JSON with what training reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    records = common.load_parts(seed=args.split_seed)["A"]
    task, config = build_task(args.model, records)
    config = config.replace(router=args.router or config.router, key_position=args.key_position)
    editor = melo_fast.patch(task.model, config, tokenizer=task.tokenizer)
    try:
        facts = facts_from_records(records)
        projection = melo_fast.train_key_projection(editor, facts, progress=False, conflict_rule=args.conflict_rule)
    finally:
        melo_fast.unpatch(task.model)
    projection.save(args.save)
    print(projection, projection.info, flush=True)
    common.write_json(Path(args.out), {
        "script": "evaluation/generality/library_projection.py",
        "command": "python evaluation/generality/library_projection.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
        "provenance": common.provenance(),
        "model": args.model,
        "router": projection.router,
        "key_position": projection.key_position,
        "radius": projection.radius,
        "conflict_rule": projection.conflict_rule,
        "training": projection.info,
        "total_seconds": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
