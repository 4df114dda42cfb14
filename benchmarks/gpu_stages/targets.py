"""The rows of the GPU-run issue's target table (but the end-to-end one), timed side by side, each figure
next to its target and, for memory-bound ops, the floor of moving its bytes once."""

from __future__ import annotations

import itertools

from .context import Ctx, Row, check, fmt_ms, load_ops, lora_inputs, singleton_db, target_verdict


@check("target", 15)
def check_lookup(ctx: Ctx) -> list[Row]:
    """Lookup C = 1k, 100k and 1M, d = 768, fp32 and bf16 centers: ≤ 2× the HBM floor (one pass over the
    centers), for a batch of 32 queries and for a single one."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["lookup"]
    bandwidth, source = ctx.nominal_bandwidth()
    rows = []
    for dtype, n_centers in itertools.product((torch.float32, torch.bfloat16), s["C"]):
        g = torch.Generator(device=ctx.device).manual_seed(4)
        centers = torch.randn(n_centers, s["d"], generator=g, device=ctx.device).to(dtype)
        db = singleton_db(centers, 0.25 * s["d"] ** 0.5)
        for n_queries in s["Q"]:
            queries = (centers[:n_queries].float() + 0.01).to(dtype)
            ms = ctx.time_ms(lambda q=queries, db=db: ops.vecdb_search(q, *db, backend="triton"))
            bytes_read = (n_centers + n_queries) * s["d"] * centers.element_size()
            floor_ms = bytes_read / bandwidth * 1e3
            name = str(dtype).removeprefix("torch.")
            rows.append(
                Row(
                    f"lookup_{'fp32' if dtype == torch.float32 else 'bf16'}",
                    "target",
                    f"lookup C={n_centers:,} d={s['d']} {name} centers, Q={n_queries}",
                    f"{fmt_ms(ms)} = {ms / floor_ms:.2f}× floor ({fmt_ms(floor_ms)}); "
                    f"{bytes_read / (ms * 1e-3) / 1e9:.0f} GB/s",
                    "≤ 2× floor",
                    target_verdict(ctx, ms <= 2 * floor_ms),
                    f"floor: {source}",
                    data=dict(ms=ms, floor_ms=floor_ms, bytes=bytes_read, C=n_centers, Q=n_queries),
                )
            )
    return rows


@check("target", 10)
def check_lookup_vs_cdist(ctx: Ctx) -> list[Row]:
    """Lookup vs ``torch.cdist`` + min + radius mask, C = 100k: ≥ 3× faster."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["cdist"]
    g = torch.Generator(device=ctx.device).manual_seed(5)
    centers = torch.randn(s["C"], s["d"], generator=g, device=ctx.device)
    centers, radii, offsets, points, blocks = singleton_db(centers, 0.25 * s["d"] ** 0.5)
    queries = torch.cat([centers[: s["Q"] // 2] + 0.01, torch.randn(s["Q"] - s["Q"] // 2, s["d"], device=ctx.device)])

    def cdist_lookup():
        dist, nearest = torch.cdist(queries, centers).min(dim=1)
        return torch.where(dist <= radii[nearest], blocks[nearest], -1)

    def fused():
        return ops.vecdb_search(queries, centers, radii, offsets, points, blocks, backend="triton")

    same = torch.equal(cdist_lookup(), fused())
    cdist_ms, fused_ms = ctx.time_ms(cdist_lookup), ctx.time_ms(fused)
    speedup = cdist_ms / fused_ms
    return [
        Row(
            "lookup_vs_cdist",
            "target",
            f"lookup vs torch.cdist + min + mask, C={s['C']:,} d={s['d']} Q={s['Q']} fp32",
            f"{speedup:.2f}× ({fmt_ms(fused_ms)} vs {fmt_ms(cdist_ms)})",
            "≥ 3×",
            target_verdict(ctx, speedup >= 3),
            "" if same else "ids differ from cdist (near ties?)",
            data=dict(fused_ms=fused_ms, cdist_ms=cdist_ms, same_ids=same),
        )
    ]


def floor_note(ctx: Ctx, bytes_moved: int, ms: float) -> tuple[str, dict]:
    """Achieved GB/s next to the floor of moving ``bytes_moved`` once (note text, data)."""
    bandwidth, source = ctx.nominal_bandwidth()
    floor_ms = bytes_moved / bandwidth * 1e3
    note = (
        f"{bytes_moved / (ms * 1e-3) / 1e9:.0f} GB/s; floor {fmt_ms(floor_ms)} for {bytes_moved / 1e6:.1f} MB "
        f"({source})"
    )
    return note, dict(bytes=bytes_moved, floor_ms=floor_ms)


def lora_bytes(s: dict, element_size: int, training: bool = False) -> int:
    """Bytes a block LoRA must move at least: each operand read once, each result written once.

    Inference in place: x, base (read and written), the used blocks of A and B. Training (forward and
    backward): x, base, out, grad_out, grad_x, grad_base, and A, B with their gradients.
    """
    tokens = s["N"] * s["T"]
    blocks = min(s.get("blocks", 1), s["N"])
    bank = blocks * s["k"] * (s["d_in"] + s["d_out"])
    if training:
        return element_size * (2 * tokens * s["d_in"] + 4 * tokens * s["d_out"] + 2 * bank)
    return element_size * (tokens * s["d_in"] + 2 * tokens * s["d_out"] + bank)


def _linear_and_lora(ctx: Ctx, s: dict):
    """A bf16 layer (weight [d_out, d_in]) and its block LoRA inputs, ``blocks`` distinct blocks."""
    torch = ctx.torch
    x, A, B, base, ids = lora_inputs(ctx, s["N"], s["T"], s["d_in"], s["d_out"], s["k"], s["blocks"])
    weight = (torch.randn(s["d_out"], s["d_in"], device=ctx.device) * s["d_in"] ** -0.5).to(torch.bfloat16)
    return x, weight, A, B, base, ids


@check("target", 10)
def check_addon(ctx: Ctx) -> list[Row]:
    """Block LoRA add-on at B×T = 8192, 4096 → 4096, k = 4, 64 distinct blocks: ≤ 10% of the base GEMM."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["addon"]
    x, weight, A, B, base, ids = _linear_and_lora(ctx, s)
    gemm_ms = ctx.time_ms(lambda: torch.nn.functional.linear(x, weight))
    rows = []
    for backend in ("triton", "torch"):
        with torch.no_grad():
            ms = ctx.time_ms(lambda b=backend: ops.block_lora(x, A, B, ids, 2.0, base, backend=b, inplace=True))
        share = ms / gemm_ms
        main = backend == "triton"
        note, floor = floor_note(ctx, lora_bytes(s, x.element_size()), ms)
        rows.append(
            Row(
                "addon",
                "target" if main else "info",
                f"add-on ({backend}, in place) N×T={s['N']}×{s['T']} {s['d_in']}→{s['d_out']} "
                f"k={s['k']}, {s['blocks']} blocks, bf16",
                f"{100 * share:.1f}% of the base GEMM ({fmt_ms(ms)} vs {fmt_ms(gemm_ms)})",
                "≤ 10%" if main else "",
                target_verdict(ctx, share <= 0.10) if main else "",
                note,
                data=dict(ms=ms, gemm_ms=gemm_ms, **floor),
            )
        )
    if ctx.device.type == "cuda":
        # do_bench times one call with its host side: a launch-bound op measures the launcher. Replayed
        # from a CUDA graph, the same pair shows what the GPU itself spends.
        with torch.no_grad():
            lora_graph_ms = ctx.time_ms_graph(
                lambda: ops.block_lora(x, A, B, ids, 2.0, base, backend="triton", inplace=True)
            )
            gemm_graph_ms = ctx.time_ms_graph(lambda: torch.nn.functional.linear(x, weight))
        note, floor = floor_note(ctx, lora_bytes(s, x.element_size()), lora_graph_ms)
        rows.append(
            Row(
                "addon",
                "info",
                "add-on (triton, in place), both replayed from a CUDA graph (GPU time, no launch overhead)",
                f"{100 * lora_graph_ms / gemm_graph_ms:.1f}% of the base GEMM ({fmt_ms(lora_graph_ms)} vs "
                f"{fmt_ms(gemm_graph_ms)})",
                note=note,
                data=dict(ms=lora_graph_ms, gemm_ms=gemm_graph_ms, **floor),
            )
        )
    return rows


@check("target", 10)
def check_decode(ctx: Ctx) -> list[Row]:
    """Decode, 64 sequences × 1 token, 4096 → 4096, 64 distinct blocks: layer + add-on ≤ 1.25× the
    base layer (eager; a CUDA-graph replay of both for reference)."""
    torch, ops = ctx.torch, load_ops()
    s = ctx.sizes["decode"]
    x, weight, A, B, base, ids = _linear_and_lora(ctx, s)

    def layer():
        return torch.nn.functional.linear(x, weight)

    def layer_with_lora():
        y = torch.nn.functional.linear(x, weight)
        return ops.block_lora(x, A, B, ids, 2.0, y, backend="triton", inplace=True)

    what = f"decode layer + add-on {{}} {s['N']}×{s['T']} {s['d_in']}→{s['d_out']}, {s['blocks']} blocks, bf16"
    with torch.no_grad():
        base_ms, lora_ms = ctx.time_ms(layer), ctx.time_ms(layer_with_lora)
        # The layer's floor: its weight and x read once, y written once, plus the add-on's operands.
        layer_bytes = weight.numel() * weight.element_size() + lora_bytes(s, x.element_size())
        note, floor = floor_note(ctx, layer_bytes, lora_ms)
        rows = [
            Row(
                "decode",
                "target",
                what.format("(eager)"),
                f"{lora_ms / base_ms:.2f}× the base layer ({fmt_ms(lora_ms)} vs {fmt_ms(base_ms)})",
                "≤ 1.25×",
                target_verdict(ctx, lora_ms <= 1.25 * base_ms),
                note,
                data=dict(ms=lora_ms, base_ms=base_ms, **floor),
            )
        ]
        if ctx.device.type == "cuda":  # the same pair without launch gaps, for tuning (not the target)
            try:
                base_ms, lora_ms = ctx.time_ms_graph(layer), ctx.time_ms_graph(layer_with_lora)
                rows.append(
                    Row(
                        "decode",
                        "info",
                        what.format("(CUDA graph)"),
                        f"{lora_ms / base_ms:.2f}× ({fmt_ms(lora_ms)} vs {fmt_ms(base_ms)})",
                        data=dict(ms=lora_ms, base_ms=base_ms),
                    )
                )
            except Exception as err:  # noqa: BLE001 - graph capture is optional here
                rows.append(Row("decode", "info", what.format("(CUDA graph)"), note=f"capture failed: {err}"[:300]))
    return rows


@check("target", 15)
def check_fwd_bwd(ctx: Ctx) -> list[Row]:
    """Block LoRA forward + backward (grads of x, A, B, base; one block, as in editing) vs the torch
    backend: ≥ 2× faster, at the training shape and at 32 × 128 tokens, 4096 → 4096."""
    torch, ops = ctx.torch, load_ops()
    rows = []
    for s in ctx.sizes["train"]:
        x, A, B, base, ids = lora_inputs(ctx, s["N"], s["T"], s["d_in"], s["d_out"], s["k"])
        leaves = [t.requires_grad_() for t in (x, A, B, base)]
        grad = torch.randn_like(base)
        times = {}
        for backend in ("triton", "torch"):

            def step(b=backend, x=leaves[0], A=leaves[1], B=leaves[2], base=leaves[3], ids=ids, grad=grad):
                ops.block_lora(x, A, B, ids, 2.0, base, backend=b).backward(grad)

            times[backend] = ctx.time_ms(step, grad_to_none=leaves)
        speedup = times["torch"] / times["triton"]
        note, floor = floor_note(ctx, lora_bytes(s, x.element_size(), training=True), times["triton"])
        rows.append(
            Row(
                "fwd_bwd",
                "target",
                f"fwd+bwd N={s['N']} T={s['T']} {s['d_in']}→{s['d_out']} k={s['k']} bf16 vs torch backend",
                f"{speedup:.2f}× ({fmt_ms(times['triton'])} vs {fmt_ms(times['torch'])})",
                "≥ 2×",
                target_verdict(ctx, speedup >= 2),
                "triton: " + note,
                data=dict(times, **floor),
            )
        )
    return rows
