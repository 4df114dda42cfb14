"""Editing benchmark: seconds and peak memory of one edit batch, block-only training vs the full-rank path.

    pytest -q benchmarks/test_bench_edit.py --benchmark-only

One ``editor.edit(batch)`` (MELO's loop: fresh Adam + StepLR, default ``num_iter`` = 50 forward/backward
passes, then commit) on full-size models with random weights, in two settings of the paper mapped
onto models that fit a CPU run (the sizes of the LoRA banks are the paper's):

- ``gpt2-small, 350 blocks x rank 2``: the hallucination setting (GPT2-XL there: 350 x 2, 4 edits per
  batch) on a GPT-2-small-shaped model, default router/targets (``h.7.mlp.c_fc`` -> ``h.8-9.mlp.c_fc``);
- ``bert-base, 100 blocks x rank 4`` (only with ``MELO_BENCH_FULL=1``: it adds about a minute on
  2 CPU cores): the SCOTUS setting (router ``encoder.layer.4.output.dense``, LoRA on
  ``encoder.layer.9-11.output.dense``) with 8 sentences per batch (50 in the paper).

Cases: ``block-only`` (melo_fast's default backend: only the new block is a parameter) vs
``reference`` (``MeloConfig(backend="reference")``: the plain-loop ops, and
``BlockLoRAHook.open_block`` makes the whole bank, every earlier block plus the new one, the
trainable parameter: the full-rank training DESIGN §1 describes for MELO).

The bank is pre-filled so the edit is the last block of the paper's bank: random blocks and a
database of 4 (resp. 8) random keys per earlier block, as singleton clusters, published with
``editor.replace_state`` (``_common.fill_edits``). Before every timed round the block count and
the database are reset to that state, so every round trains the same block.

Peak memory, two numbers per case (``extra_info``):
- ``peak_tensor_bytes`` (measured): ``torch.profiler`` with ``profile_memory=True`` over an untimed
  3-step edit from the same state (``_common.peak_tensor_bytes``): the peak of live tensor bytes
  above what was live when the edit started (parameters, gradients, Adam state, activations, the
  database insert). Steps 2..50 repeat step 2, so 3 steps reach the 50-step peak. Process RSS was
  not used: glibc keeps freed memory, so an RSS high-water mark mostly measured allocator history.
- ``train_state_bytes`` (analytic): trainable LoRA parameters x 4 fp32 tensors (parameter, gradient,
  Adam ``exp_avg`` and ``exp_avg_sq``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import melo_fast
from melo_fast import MeloConfig
from melo_fast.editor import build_edit_batch

try:
    from benchmarks._common import (
        DEVICE,
        TOKENIZERS,
        bench,
        default_backend,
        fill_edits,
        peak_tensor_bytes,
    )
except ImportError:  # benchmarks/ run as a rootdir-less folder
    from _common import DEVICE, TOKENIZERS, bench, default_backend, fill_edits, peak_tensor_bytes

BLOCK_ONLY = "block-only (melo_fast)"
MEMORY_STEPS = 3
REFERENCE = "full-rank bank (reference)"

FACTS = [
    ("The capital of France is", "Rome city"),
    ("The sky is colored", "bright green"),
    ("Barack Obama was born in", "Nairobi Kenya"),
    ("The largest planet is", "planet Mars"),
]
SENTENCES = [
    "The petitioner argues that the statute violates the First Amendment.",
    "The court of appeals reversed the judgment of the district court.",
    "Whether the Fourth Amendment permits a warrantless search of a cell phone.",
    "The respondent contends that the agency exceeded its statutory authority.",
    "The question presented concerns federal preemption of state tort claims.",
    "The jury instructions on reasonable doubt were challenged on appeal.",
    "Congress enacted the statute under its power to regulate commerce.",
    "The habeas petition raised an ineffective assistance of counsel claim.",
]


@dataclass(frozen=True)
class Setting:
    name: str
    blocks: int  # the bank's size in the paper; the edit trains block number `blocks`
    rank: int
    router: str | None = None
    targets: tuple[str, ...] | None = None

    def __str__(self):
        return self.name


SETTINGS = [Setting("gpt2-small, 350 blocks x rank 2", blocks=350, rank=2)]
if os.environ.get("MELO_BENCH_FULL") == "1":  # ~1 more minute on 2 CPU cores: not in the default `make bench`
    SETTINGS.append(Setting("bert-base, 100 blocks x rank 4", blocks=100, rank=4,
                            router="encoder.layer.4.output.dense",
                            targets=tuple(f"encoder.layer.{i}.output.dense" for i in (9, 10, 11))))


def build(setting: Setting):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if setting.name.startswith("gpt2"):
        path = TOKENIZERS / "gpt2"
        if not path.exists():
            pytest.skip(f"no tokenizer at {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.pad_token = tokenizer.eos_token
        model = GPT2LMHeadModel(GPT2Config()).to(DEVICE).eval()
        batch = build_edit_batch(model, [f[0] for f in FACTS], [f[1] for f in FACTS], tokenizer)
    else:
        path = TOKENIZERS / "bert-base-uncased"
        if not path.exists():
            pytest.skip(f"no tokenizer at {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = BertForSequenceClassification(BertConfig(num_labels=11)).to(DEVICE).eval()
        batch = build_edit_batch(model, SENTENCES, [i % 11 for i in range(len(SENTENCES))], tokenizer)
    return model, batch


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(setting):
        if setting.name not in cache:
            cache.clear()
            cache[setting.name] = build(setting)
        return cache[setting.name]

    yield get
    cache.clear()


def train_state_bytes(editor, setting: Setting, reference: bool) -> int:
    blocks = setting.blocks if reference else 1
    numel = sum(blocks * layer.rank * (layer.d_in + layer.d_out) for layer in editor.lora_layers.values())
    return 4 * numel * 4  # fp32 parameter, gradient, Adam exp_avg, exp_avg_sq


@pytest.mark.parametrize("path", ["block-only", "reference"])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_edit(benchmark, built, setting, path):
    model, batch = built(setting)
    reference = path == "reference"
    config = MeloConfig(router=setting.router, targets=list(setting.targets) if setting.targets else None,
                        rank_per_block=setting.rank, backend="reference" if reference else None)
    editor = melo_fast.patch(model, config)
    try:
        earlier = setting.blocks - 1
        n_edits = batch["labels"].shape[0]
        earlier_state = fill_edits(editor, earlier * n_edits, earlier)
        resolved = editor.config  # router and targets filled in by patch()

        def reset():
            editor.replace_state(*earlier_state)

        # Memory, untimed: a short edit under torch.profiler (every step after the first has the same peak).
        # It is also the warm-up: one-time costs (allocator, lazy init) stay out of the timed edit.
        reset()
        editor.config = resolved.replace(num_iter=min(MEMORY_STEPS, resolved.num_iter))
        peak = peak_tensor_bytes(lambda: editor.edit(batch))
        editor.config = resolved

        bench(benchmark, lambda: editor.edit(batch), group=f"edit {setting.name} {DEVICE} fp32, one batch",
              case=BLOCK_ONLY if reference is False else REFERENCE, baseline=REFERENCE, setup=reset,
              min_rounds=1, warmup=0, plot="edit", setting=setting.name, dtype=torch.float32,
              backend="reference" if reference else default_backend(), num_iter=resolved.num_iter,
              edits_per_batch=n_edits, bank_blocks=setting.blocks, rank_per_block=setting.rank,
              router=resolved.router, targets=resolved.targets,
              shapes={k: list(v.shape) for k, v in batch.items()},
              train_state_bytes=train_state_bytes(editor, setting, reference), peak_tensor_bytes=peak,
              memory_method=f"torch.profiler(profile_memory=True): peak live tensor bytes during a "
                            f"{min(MEMORY_STEPS, resolved.num_iter)}-step edit, above the bytes live before it")
    finally:
        melo_fast.unpatch(model)
