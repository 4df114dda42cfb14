"""What a trained key projection costs to make, measured in CPU time (one thread), through the library.

    python evaluation/generality/cost.py --out evaluation/generality/results/cost.json

For each model and the projection's key function: the keys of every part-A training text of the
projection (``projection.facts_of`` on ``common.projection_split``), read by ``MeloEditor.keys`` with
the router set to that key function (the forward pass stops at the router), and the training itself
(``projection.train``, 2000 steps). ``time.process_time`` of this process, so that the figures do not
depend on what else the shared machine runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import melo_fast  # noqa: E402
from evaluation.generality import common, projection  # noqa: E402
from melo_fast.config import MeloConfig  # noqa: E402

SPECS = {"minilm": "attn@5:last", "smollm2": "up@3:mean"}


def measure(model_name: str, spec: str, parts: dict) -> dict:
    train_records, _ = common.projection_split(parts["A"])
    groups, negatives = projection.facts_of(train_records)
    texts = sorted({t for g in groups for t in g} | {t for n in negatives for t in n})
    if model_name == "minilm":
        from melo_fast.eval.classifier import load_minilm

        model, tokenizer = load_minilm()
    else:
        model, tokenizer = common.load_smollm2()
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    module, layer, position = common.parse_spec(spec)
    router = common.MODULES[model_name][module].format(L=layer)
    # Any target after the router will do: only the keys are read here.
    targets = [f"model.layers.{layer + 1}.mlp.up_proj"] if model_name == "smollm2" else [
        "encoder.layer.5.intermediate.dense"]
    editor = melo_fast.patch(model, MeloConfig(router=router, targets=targets, key_position=position, init_radius=1.0))
    tokenizer.padding_side = "right"
    start = time.process_time()
    for first in range(0, len(texts), 64):
        editor.keys(dict(tokenizer(texts[first : first + 64], padding=True, return_tensors="pt")))
    key_seconds = time.process_time() - start
    melo_fast.unpatch(model)
    store = common.KeyStore(model_name)
    start = time.process_time()
    _, info = projection.train(store, spec, parts["A"])
    return {"spec": spec, "router": router, "texts": len(texts), "key_cpu_seconds": key_seconds,
            "key_cpu_ms_per_text": 1000 * key_seconds / len(texts), "train_cpu_seconds": time.process_time() - start,
            "train_steps": info["steps_run"], "parameters": info["parameters"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = common.load_parts()
    start = time.perf_counter()
    results = {name: measure(name, spec, parts) for name, spec in SPECS.items()}
    common.write_json(Path(args.out), {
        "script": "evaluation/generality/cost.py",
        "command": "python evaluation/generality/cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "provenance": common.provenance(),
        "results": results,
        "total_seconds": time.perf_counter() - start,
    })


if __name__ == "__main__":
    main()
