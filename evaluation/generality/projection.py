"""A trained key projection: router keys -> a space where paraphrases of a fact are close and other facts far.

    python evaluation/generality/projection.py --model smollm2 --spec up@19:last \
        --save /tmp/melo_generality/proj_smollm2.pt --out evaluation/generality/results/projection_smollm2.json

Trained once per model (and router) on part A of the split, used by the probe (``probe.py --projection``)
and the end-to-end runs on part B, whose subjects it never saw.

Model: ``key' = normalize(W ((x - mean) / std))``, ``W`` a ``rank x d`` matrix (no bias; the mean and
per-dimension std of the training keys are fixed first, so the learned part is only a metric). The
database then compares keys by Euclidean distance of unit vectors (a cosine).

Training data (part A only): every *fact* is a group of phrasings: the record's prompt, its rephrase
and its generate paraphrases (records of one subject with a shared original answer are one fact).
Hard negatives: the record's Relation_Specificity questions that ask *another* fact of the same subject
(``common.same_fact`` ones are left out on either side: using them as negatives would teach the
projection the dataset's artefact that statement-style wordings "are not the edit", which no user
promises). Loss: supervised InfoNCE on cosine similarities (temperature ``tau``): for each phrasing in a
minibatch of facts, another phrasing of its fact must be nearer than every phrasing of other facts and
every hard negative in the minibatch. 20% of A's subjects are held out of training to pick the number of
steps (early stopping on their held-out loss) and, in the probe, the radius; B is never looked at.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluation.generality import common  # noqa: E402
from melo_fast.eval.paraphrase_facts import facts_from_records  # noqa: E402


class KeyProjection(nn.Module):
    """``x [N, d] -> normalize(W ((x - mean) / std)) [N, rank]``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, rank: int, seed: int = 0):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        generator = torch.Generator().manual_seed(seed)
        d = mean.shape[0]
        self.weight = nn.Parameter(torch.randn(rank, d, generator=generator) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(((x - self.mean) / self.std) @ self.weight.T, dim=-1)


def facts_of(records) -> tuple[list[list[str]], list[list[str]]]:
    """``(groups, negatives)``: per fact its phrasings, and its subject's other-fact questions (hard negatives)."""
    facts = facts_from_records(records)
    return [list(f.phrasings) for f in facts], [list(f.negatives) for f in facts]


def info_nce(model, keys_of, groups, negatives, facts: list[int], tau: float, generator: random.Random):
    """Supervised InfoNCE over a minibatch of facts: two phrasings each (anchor, positive) + hard negatives."""
    texts, owner = [], []
    for f in facts:
        pair = generator.sample(groups[f], 2) if len(groups[f]) >= 2 else groups[f] * 2
        texts += pair
        owner += [f, f]
        texts += negatives[f]
        owner += [-1 - f] * len(negatives[f])  # a negative belongs to no fact (never a positive)
    z = model(keys_of(texts))
    owner = torch.tensor(owner)
    similarity = z @ z.T / tau
    anchors = (owner >= 0).nonzero().flatten()
    positive = (owner[anchors, None] == owner[None, :]) & (anchors[:, None] != torch.arange(len(texts))[None, :])
    logits = similarity[anchors].masked_fill(anchors[:, None] == torch.arange(len(texts))[None, :], -1e9)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob * positive).sum(1).div(positive.sum(1)).mean()


def train(store: common.KeyStore, spec: str, records, rank: int = 256, tau: float = 0.1, steps: int = 2000,
          batch_facts: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4,
          seed: int = 0) -> tuple[KeyProjection, dict]:
    """Train on ``records`` (part A); 20% of their subjects pick the step count. Returns (projection, log)."""
    start = time.perf_counter()
    train_records, val_records = common.projection_split(records, seed)
    train_groups, train_neg = facts_of(train_records)
    val_groups, val_neg = facts_of(val_records)
    train_texts = sorted({t for g in train_groups for t in g} | {t for n in train_neg for t in n})
    x = store.get(spec, train_texts)
    model = KeyProjection(x.mean(0), x.std(0).clamp(min=1e-6), rank, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def keys_of(texts):
        return store.get(spec, texts)

    generator = random.Random(seed)
    best = (float("inf"), 0, model.weight.detach().clone())
    log = []
    for step in range(1, steps + 1):
        facts = generator.sample(range(len(train_groups)), min(batch_facts, len(train_groups)))
        loss = info_nce(model, keys_of, train_groups, train_neg, facts, tau, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            with torch.no_grad():
                val_generator = random.Random(1)  # the same validation pairs at every check
                val = sum(
                    info_nce(model, keys_of, val_groups, val_neg, list(range(i, min(i + batch_facts, len(val_groups)))),
                             tau, val_generator).item()
                    for i in range(0, len(val_groups), batch_facts)
                )
            log.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4)})
            print(f"  step {step}: train {loss.item():.4f} val {val:.4f}", flush=True)
            if val < best[0]:
                best = (val, step, model.weight.detach().clone())
    with torch.no_grad():
        model.weight.copy_(best[2])
    info = {
        "spec": spec, "rank": rank, "tau": tau, "steps_run": steps, "best_step": best[1], "batch_facts": batch_facts,
        "lr": lr, "weight_decay": weight_decay, "seed": seed,
        "train_facts": len(train_groups), "train_texts": len(train_texts),
        "train_hard_negatives": sum(len(n) for n in train_neg),
        "val_facts": len(val_groups), "parameters": model.weight.numel(),
        "train_seconds": time.perf_counter() - start, "log": log,
    }
    return model, info


def save_projection(path: Path, model: KeyProjection, spec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec, "mean": model.mean, "std": model.std, "weight": model.weight.detach()}, path)


def load_projection(path) -> tuple[KeyProjection, str]:
    """``(projection, spec)`` saved by :func:`save_projection`."""
    saved = torch.load(path)
    model = KeyProjection(saved["mean"], saved["std"], saved["weight"].shape[0])
    with torch.no_grad():
        model.weight.copy_(saved["weight"])
    return model.eval(), saved["spec"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), required=True)
    parser.add_argument("--spec", required=True, help="<module>@<layer>:<position> (see common.spec_names)")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--save", required=True, help="where the projection goes (kept out of the repository)")
    parser.add_argument("--out", required=True, help="JSON with the training log and the probe of the projection")
    parser.add_argument("--paraphrases", default="0,3", help="user paraphrases per edit for the probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(common.SEED)
    start = time.perf_counter()
    parts = common.load_parts()
    store = common.KeyStore(args.model)
    model, info = train(store, args.spec, parts["A"], rank=args.rank, tau=args.tau, steps=args.steps,
                        weight_decay=args.weight_decay)
    save_projection(Path(args.save), model, args.spec)
    from evaluation.generality.probe import line, probe

    results = []
    for m in (int(x) for x in args.paraphrases.split(",")):
        for projection in (None, model):
            results.append(probe(store, parts, args.spec, "cos", m, projection))
            print(line(results[-1]), flush=True)
    common.write_json(Path(args.out), {
        "script": "evaluation/generality/projection.py",
        "command": "python evaluation/generality/projection.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "provenance": common.provenance(),
        "model": args.model,
        "training": info,
        "key_extraction_of_all_dev_texts": store.extraction_seconds(),
        "results": results,
        "total_seconds": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
