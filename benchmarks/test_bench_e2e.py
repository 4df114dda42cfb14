"""End-to-end benchmark: patched vs unpatched full-size models (random weights, built from configs).

    pytest -q benchmarks/test_bench_e2e.py --benchmark-only

Models: GPT-2 small (``GPT2Config()``: 12 layers, 768 hidden), BERT-base (``BertConfig()``, sequence
classification head) and T5-small (the real ``t5-small`` config from ../shared/assets/tokenizers,
``T5Config()`` defaults if it is absent), each with melo_fast's default router and targets.

- forward: one batch of B x T random token ids (T5: encoder T, decoder T/4), no grad; unpatched vs
  patched with 0, 1k and 10k edits in the database. Tokens/s in the report = tokens / time.
- generate: greedy decoding of a fixed number of new tokens (batch 1), unpatched vs patched with
  10k edits (the prompt hits one); the report gives time per generated token (prefill included, amortized).

Every patched case also times the same model with melo_fast disabled (``editor.disabled()``: the
hooks return at once) right before each of its rounds, so the two alternate; the report's paired
ratio is free of the machine-load drift that can separate rows measured a minute apart.

Edits are written directly, not trained (see ``_common.fill_edits``): one block
per 10 edits (100 blocks for 1k edits, 1000 for 10k), and the benchmark inputs' own keys are among
the stored keys, each routed to its own block, so every sample hits an edit and really runs the
LoRA (the worst case for the patched model; an input that hits no edit only pays the lookup).
"""

from __future__ import annotations

import pytest
import torch

import melo_fast

try:
    from benchmarks._common import DEVICE, TOKENIZERS, bench, default_backend, fill_edits
except ImportError:  # benchmarks/ run as a rootdir-less folder
    from _common import DEVICE, TOKENIZERS, bench, default_backend, fill_edits

MODELS = ["gpt2-small", "bert-base", "t5-small"]
GENERATIVE = ["gpt2-small", "t5-small"]
BATCH, SEQ = 4, 64
GEN_PROMPT, GEN_NEW = 32, 16
EDITS = [None, 0, 1_000, 10_000]  # None: the unpatched model
GEN_EDITS = [None, 10_000]
FORWARD_MIN_ROUNDS = 5  # the 0.95x target needs the paired rounds' median to settle
EDITS_PER_BLOCK = 10
UNPATCHED = "unpatched"


def case_name(edits) -> str:
    return UNPATCHED if edits is None else f"patched, {edits:,} edits"


def case_id(edits) -> str:
    return UNPATCHED if edits is None else f"edits{edits}"


def build_model(name: str):
    from transformers import (
        AutoConfig,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    if name == "gpt2-small":
        model = GPT2LMHeadModel(GPT2Config())
    elif name == "bert-base":
        model = BertForSequenceClassification(BertConfig(num_labels=2))
    elif name == "t5-small":
        path = TOKENIZERS / "t5-small"
        config = AutoConfig.from_pretrained(str(path)) if (path / "config.json").exists() else T5Config()
        model = T5ForConditionalGeneration(config)
    else:
        raise ValueError(name)
    return model.to(DEVICE).eval().requires_grad_(False)


def inputs(model, batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 100, (batch, seq), generator=g)
    out = {"input_ids": ids.to(DEVICE), "attention_mask": torch.ones_like(ids).to(DEVICE)}
    if model.config.is_encoder_decoder:
        start = model.config.decoder_start_token_id or 0
        decoder = torch.randint(100, vocab - 100, (batch, max(1, seq // 4)), generator=g)
        decoder[:, 0] = start
        out["decoder_input_ids"] = decoder.to(DEVICE)
    return out


def count_tokens(batch: dict) -> int:
    return sum(batch[k].numel() for k in ("input_ids", "decoder_input_ids") if k in batch)


class ModelCache:
    """One full-size model alive at a time (cases are ordered model by model)."""

    def __init__(self):
        self.name = None
        self.model = None

    def get(self, name: str):
        if self.name != name:
            self.model = None
            self.model = build_model(name)
            self.name = name
        return self.model


@pytest.fixture(scope="module")
def models():
    cache = ModelCache()
    yield cache
    cache.model = None


def prepare(model, edits, batch):
    """Unpatch; then, for ``edits`` not None, patch afresh and store ``edits`` edits hit by ``batch``."""
    if getattr(model, "_melo_editor", None) is not None:
        melo_fast.unpatch(model)
    if edits is None:
        return None
    editor = melo_fast.patch(model)
    if edits:
        n = batch["input_ids"].shape[0]
        blocks = max(n, edits // EDITS_PER_BLOCK)
        fill_edits(editor, edits, blocks, hits=editor.keys(batch))
        routed = editor.route(batch)
        assert routed.tolist() == list(range(n)), f"benchmark inputs should hit their own edits, got {routed}"
    return editor


PAIRED = "unpatched, interleaved (same model, melo_fast disabled)"


def paired(editor, fn):
    """The unedited model timed right before every round of the patched one (see ``_common.bench``)."""
    if editor is None:
        return None

    def unedited():
        with editor.disabled():
            return fn()

    return PAIRED, unedited


def record(editor, edits) -> dict:
    extra = {"edits": edits, "backend": default_backend() if editor is not None else "none"}
    if editor is not None:
        extra.update(router=editor.config.router, targets=editor.config.targets, blocks=editor.num_blocks,
                     rank_per_block=editor.config.rank_per_block, db_keys=len(editor.db))
    return extra


def cases():
    """Model by model (one full-size model built at a time): its forward cases, then its generate cases."""
    for name in MODELS:
        for edits in EDITS:
            yield pytest.param(name, "forward", edits, id=f"{name}-forward-{case_id(edits)}")
        if name in GENERATIVE:
            for edits in GEN_EDITS:
                yield pytest.param(name, "generate", edits, id=f"{name}-generate-{case_id(edits)}")


@pytest.mark.parametrize(("name", "mode", "edits"), list(cases()))
def test_e2e(benchmark, models, name, mode, edits):
    model = models.get(name)
    if mode == "forward":
        batch = inputs(model, BATCH, SEQ)
        editor = prepare(model, edits, batch)

        def run():
            with torch.no_grad():
                return model(**batch)

        group = f"e2e forward {name} {DEVICE} B={BATCH} T={SEQ} fp32"
        extra = dict(tokens=count_tokens(batch), shapes={k: list(v.shape) for k, v in batch.items()})
        rounds = FORWARD_MIN_ROUNDS
    else:
        prompt = inputs(model, 1, GEN_PROMPT, seed=1)
        prompt.pop("decoder_input_ids", None)
        editor = prepare(model, edits, prompt)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id

        def run():
            with torch.no_grad():
                return model.generate(**prompt, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW, do_sample=False,
                                      num_beams=1, pad_token_id=pad)

        group = f"e2e generate {name} {DEVICE} B=1 prompt={GEN_PROMPT} new={GEN_NEW} fp32"
        extra = dict(new_tokens=GEN_NEW, shapes={"input_ids": [1, GEN_PROMPT]})
        rounds = 3
    try:
        bench(benchmark, run, group=group, case=case_name(edits), baseline=UNPATCHED, target_s=2.0,
              min_rounds=rounds, paired=paired(editor, run), plot=f"e2e_{mode}", model=name, x=edits,
              dtype=torch.float32, **extra, **record(editor, edits))
    finally:
        if editor is not None:
            melo_fast.unpatch(model)
