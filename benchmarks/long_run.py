"""A long sequential editing run: 10,000 zsRE edits in batches of 10 on a tiny GPT-2 (a benchmark, not a test).

    python benchmarks/long_run.py [--edits 10000] [--batch 10] [--num-iter 5] [--threads 1]
                                  [--out benchmarks/long_run.json]

What it shows (issue 13): the seconds per edit batch stay flat as edits pile up, and the edits
already made are kept except where MELO's own conflict rule takes them away, which the run counts.

Edits: every (question, ``target_new``) pair of ``../shared/data/zsre_knowedit_dev.json`` (890
records; the question is ``prompt``, ``rephrase_prompt`` or one of the ``generate_prompt``
paraphrases; 28 blank paraphrases left out: 11,121 pairs over 10,574 distinct questions), shuffled
with seed 0, the first ``--edits`` of them. Nothing is synthetic. Some questions occur in several
records: 68 of them with different targets, which are genuine re-edits (the later edit wins); a
batch never holds the same question twice (the later one waits for the next batch).

Model: GPT-2 with 4 layers of width 64 and random weights, the real GPT-2 tokenizer; MELO with its
default targets, radius "auto", ``num_iter`` steps per batch.

Per batch (the JSON's ``batches``): wall seconds of ``editor.edit`` and of the database insert inside
it, keys stored, and ES = token accuracy of the batch's targets under teacher forcing right after
its edit. Every ``--every`` edits (``checkpoints``): ERR = the same accuracy over every edit made so
far, and each earlier edit's fate: kept (routes to its own block), re-edited (a later edit of the
same question), its stored key superseded by a later input whose key coincides with it (the re-edit
rule; a tiny random model maps some different questions alike), its stored key forgotten by a
conflict split, outside its own cluster (a conflict shrank the radius), or taken by a nearer
cluster. A kept edit scores exactly its ES again (its block never changes), so ERR moves only with
those fates.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import melo_fast  # noqa: E402
from benchmarks._common import MEASURED_PATHS  # noqa: E402
from melo_fast.editor import build_edit_batch  # noqa: E402
from melo_fast.eval.report import git_state  # noqa: E402
from melo_fast.vecdb import VectorDatabase  # noqa: E402

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "zsre_knowedit_dev.json"
TOKENIZER = SHARED / "assets" / "tokenizers" / "gpt2"
EVAL_CHUNK = 100


def edit_pairs(path: Path, count: int, seed: int = 0) -> list[tuple[str, str]]:
    records = json.loads(path.read_text())
    pairs = [(question, record["target_new"]) for record in records
             for question in [record["prompt"], record["rephrase_prompt"], *record["generate_prompt"]]
             if question.strip() and record["target_new"].strip()]  # a few paraphrases are blank
    random.Random(seed).shuffle(pairs)
    if count > len(pairs):
        raise SystemExit(f"{path} has {len(pairs)} edit pairs; asked for {count}")
    return pairs[:count]


def batches_of(pairs: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    """Consecutive batches of ``size``; a question already in the batch waits for the next one."""
    batches, waiting = [], list(pairs)
    while waiting:
        batch, later, seen = [], [], set()
        for pair in waiting:
            if len(batch) < size and pair[0] not in seen:
                batch.append(pair)
                seen.add(pair[0])
            else:
                later.append(pair)
        batches.append(batch)
        waiting = later
    return batches


def build_model(seed: int = 0):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tokenizer.pad_token = tokenizer.eos_token
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=128,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval(), tokenizer


def token_accuracy(model, batch) -> list[float]:
    """Per sample: fraction of target tokens predicted (greedy, teacher forcing), with the model's routing."""
    with torch.no_grad():
        logits = model(**batch).logits
    labels = batch["labels"][:, 1:]
    hit = (logits[:, :-1].argmax(-1) == labels) & (labels != -100)
    return (hit.sum(1) / (labels != -100).sum(1)).tolist()


def keys_and_scores(editor, model, tokenizer, pairs):
    keys, scores = [], []
    for start in range(0, len(pairs), EVAL_CHUNK):
        chunk = pairs[start : start + EVAL_CHUNK]
        batch = build_edit_batch(model, [q for q, _ in chunk], [t for _, t in chunk], tokenizer)
        keys.append(editor.keys(batch))
        scores += token_accuracy(model, batch)
    return torch.cat(keys), scores


def taken_over(keys: torch.Tensor, targets: list[str], tolerance: float) -> list[bool]:
    """Per edit: a later edit with another target has a key within ``tolerance`` of its key (the re-edit
    rule then takes its stored point over, even for another question when the model maps both alike)."""
    result = []
    for start in range(0, len(keys), 1000):
        close = torch.cdist(keys[start : start + 1000].double(), keys.double()) <= tolerance
        for row, i in enumerate(range(start, min(start + 1000, len(keys)))):
            later = close[row, i + 1 :].nonzero()[:, 0].tolist()
            result.append(any(targets[i + 1 + j] != targets[i] for j in later))
    return result


def fates(editor, keys: torch.Tensor, blocks: list[int], reedited: list[bool], taken: list[bool]) -> dict:
    """Why each earlier edit does or does not route to its own block (see the module docstring)."""
    db = editor.db
    routes = db.search(keys).tolist()
    torch_routes = db.search(keys, backend="torch").tolist()
    tolerance = db.coincide_tolerance
    owner = torch.searchsorted(db.point_offsets[1:], torch.arange(len(db)), right=True)
    own_cluster = []
    for start in range(0, len(keys), 1000):
        distance = torch.cdist(keys[start : start + 1000].double(), db.points.double())
        block = torch.tensor(blocks[start : start + 1000])[:, None]
        distance = distance.masked_fill(db.point_blocks[None, :] != block, float("inf"))
        best, point = distance.min(1)
        own_cluster += torch.where(best <= tolerance, owner[point], -1).tolist()
    nearest = torch.cdist(keys.double(), db.centers.double()).argmin(1).tolist()
    counts = dict.fromkeys(["kept", "re-edited", "key superseded by a coinciding later input",
                            "key forgotten by a conflict split", "outside its shrunk cluster",
                            "taken by a nearer cluster", "cpp radius edge (torch backend routes it home)"], 0)
    for i, block in enumerate(blocks):
        if routes[i] == block:
            counts["kept"] += 1
        elif reedited[i]:
            counts["re-edited"] += 1
        elif torch_routes[i] == block:
            counts["cpp radius edge (torch backend routes it home)"] += 1
        elif own_cluster[i] < 0 and taken[i]:
            counts["key superseded by a coinciding later input"] += 1
        elif own_cluster[i] < 0:
            counts["key forgotten by a conflict split"] += 1
        elif nearest[i] == own_cluster[i]:
            counts["outside its shrunk cluster"] += 1
        else:
            counts["taken by a nearer cluster"] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--num-iter", type=int, default=5)
    parser.add_argument("--every", type=int, default=1000, help="edits between ERR checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "long_run.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = build_model()
    editor = melo_fast.patch(model, melo_fast.MeloConfig(num_iter=args.num_iter), tokenizer=tokenizer)
    batches = batches_of(edit_pairs(DATA, args.edits), args.batch)

    insert_seconds: list[float] = []
    original_insert = VectorDatabase.insert

    def timed_insert(self, *a, **k):
        start = time.perf_counter()
        try:
            return original_insert(self, *a, **k)
        finally:
            insert_seconds.append(time.perf_counter() - start)

    VectorDatabase.insert = timed_insert
    done: list[tuple[str, str]] = []
    done_blocks, done_es = [], []
    last_edit_of: dict[str, int] = {}
    per_batch, checkpoints = [], []
    next_checkpoint = args.every
    started = time.perf_counter()
    try:
        for number, batch_pairs in enumerate(batches):
            prompts, targets = [q for q, _ in batch_pairs], [t for _, t in batch_pairs]
            result = editor.edit_texts(prompts, targets, tokenizer)
            es = token_accuracy(model, build_edit_batch(model, prompts, targets, tokenizer))
            for pair, score in zip(batch_pairs, es, strict=True):
                last_edit_of[pair[0]] = len(done)
                done.append(pair)
                done_blocks.append(result.block_id)
                done_es.append(score)
            per_batch.append({
                "batch": number, "edits": len(done), "seconds": result.seconds, "insert_seconds": insert_seconds[-1],
                "keys_stored": len(editor.db), "clusters": editor.db.num_clusters, "es": statistics.mean(es),
                "new_clusters": result.new_clusters, "merged": result.merged, "conflicts": result.conflicts,
                "forgotten": result.forgotten, "superseded": result.superseded,
            })
            if len(done) >= next_checkpoint or number == len(batches) - 1:
                next_checkpoint += args.every
                keys, scores = keys_and_scores(editor, model, tokenizer, done)
                reedited = [last_edit_of[q] != i for i, (q, _) in enumerate(done)]
                taken = taken_over(keys, [t for _, t in done], editor.db.coincide_tolerance)
                fate = fates(editor, keys, done_blocks, reedited, taken)
                current = [s for s, r in zip(scores, reedited, strict=True) if not r]
                checkpoints.append({
                    "edits": len(done), "err": statistics.mean(scores),
                    "err_latest_edit_per_question": statistics.mean(current),
                    "es_of_the_same_edits": statistics.mean(done_es), "fates": fate, "db": editor.db.stats(),
                    "elapsed_seconds": time.perf_counter() - started,
                })
                print(f"{len(done):>6} edits  ERR {checkpoints[-1]['err']:.3f} (ES {statistics.mean(done_es):.3f})  "
                      f"{fate}  {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        VectorDatabase.insert = original_insert

    def window(rows, key):
        return statistics.median(row[key] for row in rows)

    first, last = per_batch[:100], per_batch[-100:]
    summary = {
        "edits": len(done), "batches": len(per_batch), "num_iter": args.num_iter, "threads": args.threads,
        "init_radius": editor.db.init_radius,
        "median_seconds_first_100_batches": window(first, "seconds"),
        "median_seconds_last_100_batches": window(last, "seconds"),
        "median_insert_seconds_first_100_batches": window(first, "insert_seconds"),
        "median_insert_seconds_last_100_batches": window(last, "insert_seconds"),
        "mean_es": statistics.mean(row["es"] for row in per_batch),
        "final_err": checkpoints[-1]["err"], "final_fates": checkpoints[-1]["fates"], "db": editor.db.stats(),
        "reedited_questions": sum(1 for i, (q, _) in enumerate(done) if last_edit_of[q] != i),
        "torch": torch.__version__, "source": git_state(ROOT, MEASURED_PATHS),
    }
    args.out.write_text(json.dumps({"summary": summary, "checkpoints": checkpoints, "batches": per_batch}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
