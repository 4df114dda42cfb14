"""Correctness on the GPU where no unit test reaches: offsets past 2³¹ elements, the training shape against
fp64, in place at scale, ties across scan splits at 1M centers, no compilation while serving after warm-up."""

from __future__ import annotations

import time

from .compilation import compiled_kernels
from .context import Ctx, Row, bits, check, load_ops, lora_inputs, rel_l2, singleton_db, verdict


@check("correctness", 25)
def check_big_search(ctx: Ctx) -> list[Row]:
    """Lookup with element offsets past 2³¹: C = 270k centers of d = 8192 in bf16, queried near
    centers above index 2³¹ / d = 262,144 (and below)."""
    torch, ops = ctx.torch, load_ops()
    C, d, Q = (ctx.sizes["big_search"][key] for key in ("C", "d", "Q"))
    first_high = min(2**31 // d, C - Q)
    g = torch.Generator(device=ctx.device).manual_seed(1)
    centers = torch.randn(C, d, generator=g, device=ctx.device).to(torch.bfloat16)
    picks = torch.cat(
        [
            torch.randint(first_high, C, (Q // 2,), generator=g, device=ctx.device),
            torch.randint(0, first_high, (Q - Q // 2,), generator=g, device=ctx.device),
        ]
    )
    queries = (centers[picks].float() + 0.01 * torch.randn(Q, d, generator=g, device=ctx.device)).to(torch.bfloat16)
    ids = ops.vecdb_search(queries, *singleton_db(centers, 0.25 * d**0.5), backend="triton")
    ok = torch.equal(ids, picks)
    top = C * d
    return [
        Row(
            "big_search",
            "correctness",
            f"lookup C={C:,} d={d} bf16, queries near centers ≥ {first_high:,}",
            f"{int((ids == picks).sum())}/{Q} right; offsets up to {top:,} (2³¹ = {2**31:,})",
            f"{Q}/{Q}",
            verdict(ok),
        )
    ]


@check("correctness", 20)
def check_big_lora(ctx: Ctx) -> list[Row]:
    """Block LoRA with output offsets past 2³¹: N = 1, T = 270k, 64 → 8192, bf16; rows before and
    past 2³¹ / d_out compared with an fp32 computation."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["big_lora"]
    x, A, B, base, ids = lora_inputs(ctx, s["N"], s["T"], s["d_in"], s["d_out"], s["k"])
    out = ops.block_lora(x, A, B, ids, 2.0, base, backend="triton")
    high = min(2**31 // s["d_out"], s["T"] - 8)
    rows = torch.cat([torch.arange(0, 16, device=ctx.device), torch.arange(high, s["T"], device=ctx.device)])
    expected = base[0, rows].float() + 2.0 * (x[0, rows].float() @ A[0].float().T) @ B[0].float()
    error = rel_l2(out[0, rows], expected)
    last = s["N"] * s["T"] * s["d_out"]
    return [
        Row(
            "big_lora",
            "correctness",
            f"block LoRA N=1 T={s['T']:,} {s['d_in']}→{s['d_out']} bf16, rows ≥ {high:,} vs fp32",
            f"rel. L2 error {error:.1e}; offsets up to {last:,}",
            "≤ 1e-2",
            verdict(error <= 1e-2),
            data=dict(rel_l2=error),
        )
    ]


@check("correctness", 20)
def check_training_shape(ctx: Ctx) -> list[Row]:
    """The training shape (N = 1, T = 4096, 14336 → 4096, k = 8) forward and backward, bf16 and fp32,
    against the torch backend in fp64."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["train"][0]
    rows = []
    for dtype, tolerance in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        x, A, B, base, ids = lora_inputs(ctx, s["N"], s["T"], s["d_in"], s["d_out"], s["k"], dtype=dtype)
        g = torch.randn_like(base)
        results = {}
        for backend, cast in (("triton", dtype), ("torch", torch.float64)):
            leaves = [t.detach().to(cast).requires_grad_() for t in (x, A, B, base)]
            out = ops.block_lora(*leaves[:3], ids, 2.0, leaves[3], backend=backend)
            out.backward(g.to(cast))
            results[backend] = [out.detach()] + [leaf.grad for leaf in leaves]
        errors = {
            name: rel_l2(a, b)
            for name, a, b in zip(
                ("out", "grad x", "grad A", "grad B", "grad base"), results["triton"], results["torch"], strict=True
            )
        }
        worst = max(errors, key=errors.get)
        rows.append(
            Row(
                "training_shape",
                "correctness",
                f"fwd+bwd N={s['N']} T={s['T']} {s['d_in']}→{s['d_out']} k={s['k']} "
                f"{str(dtype).removeprefix('torch.')} vs fp64",
                f"max rel. L2 error {errors[worst]:.1e} ({worst})",
                f"≤ {tolerance:g}",
                verdict(all(e <= tolerance for e in errors.values())),
                data=errors,
            )
        )
    return rows


@check("correctness", 15)
def check_inplace_at_scale(ctx: Ctx) -> list[Row]:
    """In place (32 × 512 tokens, 4096 → 4096, ids mixing -1 and real blocks), bf16 and fp16: bitwise
    equal to out of place; the rows of unedited samples untouched."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["inplace"]
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        ids = torch.tensor([-1 if n % 3 == 0 else n % s["blocks"] for n in range(s["N"])], device=ctx.device)
        x, A, B, base, ids = lora_inputs(ctx, s["N"], s["T"], s["d_in"], s["d_out"], s["k"], s["blocks"], dtype, ids)
        expected = ops.block_lora(x, A, B, ids, 2.0, base, backend="triton")
        target = base.clone()
        with torch.no_grad():
            ops.block_lora(x, A, B, ids, 2.0, target, backend="triton", inplace=True)
        same = torch.equal(bits(target), bits(expected))
        untouched = torch.equal(bits(target[ids < 0]), bits(base[ids < 0]))
        changed = not torch.equal(bits(target[ids >= 0]), bits(base[ids >= 0]))
        rows.append(
            Row(
                "inplace_at_scale",
                "correctness",
                f"in place {s['N']}×{s['T']} {s['d_in']}→{s['d_out']} {str(dtype).removeprefix('torch.')}",
                f"bitwise equal: {same}; unedited untouched: {untouched}; edited changed: {changed}",
                "all true",
                verdict(same and untouched and changed),
            )
        )
    return rows


@check("correctness", 20)
def check_ties(ctx: Ctx) -> list[Row]:
    """Exact ties across scan splits at C = 1M: three identical centers far apart in index; the
    lowest index wins. The other queries must match the torch backend."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["ties"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=ctx.device).manual_seed(2)
        centers = torch.randn(s["C"], s["d"], generator=g, device=ctx.device).to(dtype)
        tied = [7, s["C"] * 3 // 10 + 1, s["C"] - 1]
        centers[tied] = centers[7].clone()
        half = s["Q"] // 2
        near_tie = centers[[7] * half].float() + 1e-3 * torch.randn(half, s["d"], generator=g, device=ctx.device)
        others = centers[torch.randint(0, s["C"], (s["Q"] - half,), generator=g, device=ctx.device)].float()
        queries = torch.cat([near_tie, others + 0.01 * torch.randn_like(others)]).to(dtype)
        db = singleton_db(centers, 0.25 * s["d"] ** 0.5)
        ids = ops.vecdb_search(queries, *db, backend="triton")
        expected = ops.vecdb_search(queries, *db, backend="torch")
        lowest = bool((ids[:half] == 7).all())
        rows.append(
            Row(
                "ties",
                "correctness",
                f"ties at indices {tied} of C={s['C']:,} {str(dtype).removeprefix('torch.')}",
                f"lowest index wins: {lowest}; all {s['Q']} equal to the torch backend: {torch.equal(ids, expected)}",
                "both true",
                verdict(lowest and torch.equal(ids, expected)),
            )
        )
    return rows


@check("correctness", 15)
def check_no_compile_after_warmup(ctx: Ctx) -> list[Row]:
    """``melo_fast.ops.warmup`` for one layer shape, then a serving sweep (growing bank and database,
    decode steps, new batch sizes): Triton's caches must not grow (CUDA only; the dry run and the
    compile check test the same with Triton's binder)."""
    if ctx.device.type != "cuda":
        return [
            Row(
                "no_compile_after_warmup",
                "correctness",
                "kernels compiled while serving after warm-up",
                verdict="n/a",
                note="dry run: see the compile check's serving sweep",
            )
        ]
    torch, ops = ctx.torch, load_ops()
    from . import compile_report

    s = ctx.sizes["warmup"]
    dtypes = (torch.bfloat16, torch.float32)
    start = time.perf_counter()
    calls = sum(ops.warmup([s["lora"]], key_dim=s["key_dim"], dtype=dtype, key_dtype=torch.float32) for dtype in dtypes)
    ctx.sync()
    warm_s = time.perf_counter() - start
    before = len(compiled_kernels())
    sweep = compile_report.serving_sweep(s["lora"], s["key_dim"], dtypes, ctx.device)
    ctx.sync()
    new = len(compiled_kernels()) - before
    return [
        Row(
            "no_compile_after_warmup",
            "correctness",
            f"serving sweep of {sweep} calls after ops.warmup ({calls} calls, {warm_s:.1f} s)",
            f"{new} new compilations",
            "0",
            verdict(new == 0),
            data=dict(warmup_s=warm_s, variants_before=before),
        )
    ]
