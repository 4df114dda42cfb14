"""Seconds per edit batch: MELO's fixed loop against melo_fast's default, side by side in one run.

    PYTHONPATH=. python benchmarks/edit_speed.py --threads 2 --out benchmarks/edit_speed.json

MELO's loop (``MeloConfig(stop_loss=None, cache_frozen_prefix=False)``) trains every block for
``num_iter`` = 50 steps through the whole model. The default replays the frozen blocks below the first
target (``melo_fast.editing.frozen_prefix``) and stops once the edit has converged (``melo_fast.editing.convergence``).
For each model, two copies are patched, one per configuration, and fed the same batches of 10 zsRE
dev edits; the two edits of a batch run back to back, so both see the same machine load. Models:
SmolLM2-135M-Instruct (real weights), and GPT-2-small- and T5-small-shaped models with random weights
(real tokenizers). Random models rarely converge in 50 steps, so on them the early stop seldom fires and
the figure is mostly the frozen prefix's.

Quality (``--quality-records``, SmolLM2 only): the evaluation harness (``melo_fast.eval``) runs both
configurations on the same dev records and reports ES, ERR, generality and locality side by side.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEV = ROOT.parent / "shared" / "data" / "zsre_knowedit_dev.json"
TOKENIZERS = ROOT.parent / "shared" / "assets" / "tokenizers"
CONFIGS = {
    "melo_fixed_loop": dict(stop_loss=None, cache_frozen_prefix=False),
    "default": {},
}


def _models(smollm2: bool):
    """``(name, model, tokenizer)`` of each benchmarked model (eval mode, fp32)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel, T5ForConditionalGeneration

    torch.manual_seed(0)
    if smollm2:
        from melo_fast.eval.local_model import load_smollm2

        model, tokenizer = load_smollm2()
        yield "SmolLM2-135M-Instruct", model.eval(), tokenizer
    gpt2_tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS / "gpt2"))
    gpt2_tokenizer.pad_token = gpt2_tokenizer.eos_token
    yield "GPT-2-small shape (random)", GPT2LMHeadModel(GPT2Config()).eval(), gpt2_tokenizer
    t5_config = AutoConfig.from_pretrained(str(TOKENIZERS / "t5-small"))
    yield (
        "T5-small shape (random)",
        T5ForConditionalGeneration(t5_config).eval(),
        AutoTokenizer.from_pretrained(str(TOKENIZERS / "t5-small")),
    )


def time_batches(model, tokenizer, records, batches: int) -> dict:
    """Per configuration: seconds and optimizer steps of each edit batch (the same batches, interleaved)."""
    import torch

    import melo_fast

    copies = {name: copy.deepcopy(model) for name in CONFIGS}
    editors = {
        name: melo_fast.patch(copies[name], melo_fast.MeloConfig(**changes), tokenizer=tokenizer)
        for name, changes in CONFIGS.items()
    }
    for editor in editors.values():
        editor.calibrate()  # the key scale is measured once, outside the timed edits
    out = {name: dict(seconds=[], steps=[], loss=[]) for name in CONFIGS}
    for b in range(batches):
        chunk = records[10 * b : 10 * (b + 1)]
        prompts, targets = [r.prompt for r in chunk], [r.target_new for r in chunk]
        for name, editor in editors.items():
            torch.manual_seed(b)
            start = time.perf_counter()
            result = editor.edit_texts(prompts, targets, tokenizer)
            out[name]["seconds"].append(time.perf_counter() - start)
            out[name]["steps"].append(result.steps)
            out[name]["loss"].append(result.loss)
        print(f"  batch {b + 1}/{batches}: " + ", ".join(
            f"{name} {out[name]['seconds'][-1]:.2f} s ({out[name]['steps'][-1]} steps)" for name in CONFIGS
        ), flush=True)  # fmt: skip
    for name in CONFIGS:
        melo_fast.unpatch(copies[name])
    fixed, default = (statistics.median(out[name]["seconds"]) for name in CONFIGS)
    return dict(configs=out, median_seconds={"melo_fixed_loop": fixed, "default": default}, speedup=fixed / default)


def quality(records_path: Path, limit: int) -> dict:
    """ES, ERR, generality, locality and edit seconds of both configurations on the same dev records."""
    import melo_fast
    from melo_fast.eval.data import load_records
    from melo_fast.eval.harness import SequentialEval, Settings
    from melo_fast.eval.local_model import load_smollm2
    from melo_fast.eval.tasks import task_for

    model, tokenizer = load_smollm2()
    records = load_records(records_path, limit=limit)
    harness = SequentialEval(task_for(model, tokenizer), records, Settings(progress=False))
    out = {"setup": harness.describe()}
    for name, changes in CONFIGS.items():
        result = harness.run_melo(melo_fast.MeloConfig(**changes)).to_dict()
        out[name] = result
        shown = {key: round(result["metrics"][key], 3) for key in ("es", "err", "locality") if key in result["metrics"]}
        print(f"  quality {name}: {shown}, edit {result['edit_seconds']:.0f} s", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-smollm2", action="store_true", help="skip SmolLM2-135M-Instruct (and the quality run)")
    parser.add_argument("--batches", type=int, default=5, help="edit batches of 10 per model")
    parser.add_argument("--quality-records", type=int, default=100, help="dev records of the quality run (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "edit_speed.json"))
    args = parser.parse_args(argv)
    import torch

    from melo_fast.eval.data import load_records

    torch.set_num_threads(args.threads)
    records = load_records(DEV, limit=10 * args.batches)
    report = dict(
        command="python benchmarks/edit_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        source=dict(commit=_git("rev-parse", "HEAD"), changed=_git("status", "--porcelain", "melo_fast").split()),
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        configs=CONFIGS,
        models={},
    )
    for name, model, tokenizer in _models(not args.no_smollm2):
        print(f"{name}:", flush=True)
        report["models"][name] = time_batches(model, tokenizer, records, args.batches)
        print(f"  speedup (median seconds per batch): {report['models'][name]['speedup']:.2f}x", flush=True)
    if not args.no_smollm2 and args.quality_records:
        report["quality"] = quality(DEV, args.quality_records)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


def _git(*command: str) -> str:
    done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
