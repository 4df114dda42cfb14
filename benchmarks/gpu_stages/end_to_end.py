"""End to end: a GPT-2-medium-shaped model in bf16 with 10k edits, every sample hitting one, patched vs
unpatched tokens/s."""

from __future__ import annotations

import statistics
import time

from .context import Ctx, Row, check, target_verdict


def build_edited_gpt2(ctx: Ctx, s: dict):
    """MODEL LEVEL, kept in this one function so it can follow the core's API.

    A GPT-2-shaped model (``n_embd``, ``n_layer``, ``n_head`` from ``s``; random weights, bf16) patched
    with the Triton backend and holding ``s["edits"]`` stored keys: the benchmark batch's own keys,
    each routed to a block (so every sample hits an edit), the rest synthetic
    (``benchmarks/_common.fill_edits``, published with ``editor.replace_state``), plus one real edit made with
    ``editor.edit``. Returns ``(model, editor, batch)``; raises if any sample misses its edit.
    """
    torch = ctx.torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import melo_fast
    from benchmarks._common import fill_edits

    torch.manual_seed(0)
    config = GPT2Config(n_embd=s["n_embd"], n_layer=s["n_layer"], n_head=s["n_head"])
    with torch.device(ctx.device):  # initialize on the device: a CPU init of 355M weights is slow
        model = GPT2LMHeadModel(config)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    editor = melo_fast.patch(model, melo_fast.MeloConfig(backend="triton", num_iter=s["edit_iters"]))
    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    ids = torch.randint(100, vocab - 100, (s["batch"], s["seq"]), generator=g).to(ctx.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    blocks = max(s["batch"], s["edits"] // 10)
    # The synthetic database carries an absolute radius, so the real edit below needs no tokenizer.
    fill_edits(editor, s["edits"] - 2, blocks, hits=editor.keys(batch))
    prompt = torch.randint(100, vocab - 100, (2, 6), generator=g).to(ctx.device)
    labels = torch.full_like(prompt, -100)
    labels[:, -2:] = prompt[:, -2:]
    edit_batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "labels": labels}
    result = editor.edit(edit_batch)
    routed = editor.route(batch)
    if not bool((routed >= 0).all()):
        raise AssertionError(f"every benchmark sample should hit an edit, got {routed.tolist()}")
    edited = editor.route(edit_batch)  # with its labels: the key is the prompt's, as when it was stored
    if edited.tolist() != [result.block_id] * 2:
        raise AssertionError(f"the real edit should route to block {result.block_id}, got {edited.tolist()}")
    return model, editor, batch


@check("target", 45)
def check_e2e(ctx: Ctx) -> list[Row]:
    """End to end: GPT-2-medium-shaped model, bf16, 32 × 128 tokens, 10k edits, every sample hitting
    an edit: patched ≥ 0.95× unpatched tokens/s (median of per-round ratios, rounds interleaved)."""
    torch = ctx.torch
    s = ctx.sizes["e2e"]
    model, editor, batch = build_edited_gpt2(ctx, s)
    tokens = batch["input_ids"].numel()

    def forward():
        for _ in range(s["calls"]):
            model(**batch)
        ctx.sync()

    def timed(fn) -> float:
        ctx.sync()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) / s["calls"]

    def unpatched():
        with editor.disabled():
            forward()

    with torch.no_grad():
        unpatched()  # warm-up: kernels compiled, caches filled
        forward()
        ratios, patched_s, unpatched_s = [], [], []
        for _ in range(s["rounds"]):
            u, p = timed(unpatched), timed(forward)
            unpatched_s.append(u)
            patched_s.append(p)
            ratios.append(u / p)
    ratio = statistics.median(ratios)
    tps_u, tps_p = tokens / statistics.median(unpatched_s), tokens / statistics.median(patched_s)
    return [
        Row(
            "e2e",
            "target",
            f"GPT-2-medium shape ({s['n_layer']}×{s['n_embd']}) bf16, {s['batch']}×{s['seq']} "
            f"tokens, {len(editor.db):,} edits, all hitting",
            f"{ratio:.3f}× ({tps_p:,.0f} vs {tps_u:,.0f} tokens/s)",
            "≥ 0.95×",
            target_verdict(ctx, ratio >= 0.95),
            f"median of {s['rounds']} interleaved rounds",
            data=dict(
                ratios=ratios,
                patched_s=patched_s,
                unpatched_s=unpatched_s,
                keys=len(editor.db),
                blocks=editor.num_blocks,
            ),
        )
    ]
