"""Facts of the dev file that bound what any generality method can score (counts only, no text copied).

    python evaluation/generality/datafacts.py --out evaluation/generality/results/data_facts.json

- Relation_Specificity questions that ask their own record's fact (``common.same_fact`` against the record
  itself): an edit that reaches its paraphrases changes their answer, and raw locality counts it as a failure.
- Per part of the split: locality questions that ask an edited fact (relation and never-edited ones).
- ``generate_prompt`` entries that are not questions (punctuation only), and the records that have them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluation.generality import common  # noqa: E402
from melo_fast.eval.data import load_records  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    records = load_records(common.DEV_DATA)
    relation = [(r, p) for r in records for p in common.relation_probes(r)]
    own = sum(common.same_fact(r.subject, p.ground_truth, [r]) for r, p in relation)
    junk = [(r, g) for r in records for g in r.generate_prompts if g not in common.paraphrases(r)]
    parts = {}
    for name, part in common.load_parts().items():
        edited, held = common.edited_and_held(part)
        rel = [common.same_fact(r.subject, p.ground_truth, edited)
               for r in edited + held for p in common.relation_probes(r)]
        une = [common.same_fact(r.subject, r.ground_truth, edited) for r in held] * 2
        parts[name] = {"records": len(part), "subjects": len({r.subject for r in part}), "edited": len(edited),
                       "never_edited": len(held), "relation_questions": len(rel), "relation_same_fact": sum(rel),
                       "never_edited_questions": len(une), "never_edited_same_fact": sum(une)}
    common.write_json(Path(args.out), {
        "script": "evaluation/generality/datafacts.py",
        "command": "python evaluation/generality/datafacts.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "provenance": common.provenance(),
        "records": len(records),
        "relation_questions": len(relation),
        "relation_questions_of_own_fact": own,
        "generate_prompts": sum(len(r.generate_prompts) for r in records),
        "generate_prompts_not_questions": len(junk),
        "records_with_such_prompts": len({r.index for r, _ in junk}),
        "parts": parts,
    })


if __name__ == "__main__":
    main()
