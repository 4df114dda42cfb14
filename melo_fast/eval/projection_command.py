"""``python -m melo_fast projection``: train a key projection for a local model on a KnowEdit file.

    python -m melo_fast projection --model PATH --data FILE --out projection.safetensors \
        [--router NAME] [--key-position last|mean] [--rank 256] [--steps 2000] [--locality 0.99] \
        [--no-number-negatives]

The facts are :func:`~melo_fast.eval.paraphrase_facts.facts_from_records` of every record of ``FILE``
(records with ``rephrase_prompt`` or ``generate_prompt`` teach it; their locality questions are the
hard negatives). Use paraphrase data, not the facts you will edit. Then
``melo_fast.patch(model, MeloConfig(router=..., key_position=...), key_projection=KeyProjection.load(out))``
with the router and key position it prints.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face model folder or .gguf file")
    parser.add_argument("--data", required=True, help="KnowEdit-format JSON with paraphrases (e.g. zsRE)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write the projection to")
    parser.add_argument("--router", default=None, help="router module (default: the one patch() chooses)")
    parser.add_argument("--key-position", default="last", choices=("last", "mean"))
    parser.add_argument("--rank", type=int, default=256, help="projected key width")
    parser.add_argument("--steps", type=int, default=2000, help="the most training steps")
    parser.add_argument("--locality", type=float, default=0.99,
                        help="share of held-out questions the chosen radius must keep out of other edits")
    parser.add_argument("--conflict-rule", default="voronoi", choices=("voronoi", "split"),
                        help="the database rule the radii are chosen under and edits then use (split: MELO's)")
    parser.add_argument("--no-number-negatives", dest="number_negatives", action="store_false",
                        help="train on the records' own negatives only, without each numbered subject's wordings "
                             "with the number changed")
    parser.set_defaults(run=run)


def run(args) -> None:
    import melo_fast
    from melo_fast.eval.data import load_records
    from melo_fast.eval.local_model import load_local_model
    from melo_fast.eval.paraphrase_facts import facts_from_records

    facts = facts_from_records(load_records(args.data))  # a malformed file stops here, before the model loads
    model, tokenizer = load_local_model(args.model)
    config = melo_fast.MeloConfig(router=args.router, key_position=args.key_position)
    editor = melo_fast.patch(model, config, tokenizer=tokenizer)
    projection = melo_fast.train_key_projection(
        editor, facts, rank=args.rank, steps=args.steps, locality=args.locality, conflict_rule=args.conflict_rule,
        number_negatives=args.number_negatives,
    )
    projection.save(args.out)
    print(f"wrote {args.out}: {projection}")
    held_out = dict(projection.info["held_out"])
    stopped = held_out.pop("stopped_by")
    print(f"held-out facts: {held_out}")
    if stopped["radius"] is not None:  # why the radius is not larger: the questions a larger one lets in
        print(f"at radius {stopped['radius']} the held-out folds let in {stopped['let_in']}; the nearest:")
        for q in stopped["questions"][:5]:
            print(f"  {q['distance']:.3f}  {q['question']!r} taken for {q['nearest_edit_wording']!r}")
    print(
        f"use it: melo_fast.patch(model, MeloConfig(router={projection.router!r}, "
        f"key_position={projection.key_position!r}), key_projection=KeyProjection.load({args.out!r}))"
    )
