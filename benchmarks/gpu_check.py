"""One prepared GPU check of the Triton kernels: correctness, compiled variants, op speed, end to end.

    PYTHONPATH=. python benchmarks/gpu_check.py --budget-s 420 --out DIR    # on a CUDA machine
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run --out DIR         # anywhere: CPU, Triton interpreter
    PYTHONPATH=. python benchmarks/gpu_check.py --list                      # the checks, in run order
    PYTHONPATH=. python benchmarks/gpu_check.py --only lookup_fp32,e2e ...  # some of them

Everything runs from the source tree with the machine's torch, triton and transformers: no network,
no C++ build. On CUDA, within ``--budget-s`` seconds:

- correctness: the compiled kernels against the reference where no unit test reaches (offsets past
  2³¹ elements, the training shape against fp64, in place at scale, ties across scan splits at 1M
  centers), the Triton and ops unit tests (``pytest``), ``compute-sanitizer`` on small cases, and no
  kernel compiled while serving after ``melo_fast.ops.warmup``;
- compile: every production kernel variant compiled for sm_90 on the CPU, with ptxas's resource
  report (no register spills), and the spills the driver reports for what the run compiled;
- targets: the rows of the GPU-run issue's target table, timed side by side with
  ``triton.testing.do_bench`` (median; L2 flushed before every call), each figure next to its
  target and marked met / not met from the data;
- end to end: a GPT-2-medium-shaped model in bf16 with 10k edits, every sample hitting one.

It writes ``gpu_check.json`` (device, versions, every figure) and ``gpu_check.md`` to ``--out`` and
prints the tables last. Exit status: 0 when every check ran and passed, 1 when one failed or broke,
2 when none failed but some did not run (budget, ``--only``). Performance targets are findings,
not checks: met or not, they do not change the status.

``--dry-run`` runs the same code with tiny shapes in the Triton interpreter (CPU); its timings are
CPU figures of tiny problems, so its target verdicts read "dry run". ``tests/test_gpu_check.py``
runs it in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

# Nominal HBM bandwidth (bytes/s) by device name: the "floor" of a memory-bound op is its
# bytes over this. Other devices use the copy bandwidth measured in the run.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}

# Problem sizes: the GPU run, and the dry run (same code, tiny shapes).
SIZES = {
    "gpu": dict(
        lookup=dict(C=1_000_000, d=768, Q=(32, 1)),
        cdist=dict(C=100_000, d=768, Q=32),
        addon=dict(N=64, T=128, d_in=4096, d_out=4096, k=4, blocks=64),
        decode=dict(N=64, T=1, d_in=4096, d_out=4096, k=4, blocks=64),
        train=(dict(N=1, T=4096, d_in=14336, d_out=4096, k=8), dict(N=32, T=128, d_in=4096, d_out=4096, k=4)),
        big_search=dict(C=270_000, d=8192, Q=32),
        big_lora=dict(N=1, T=270_000, d_in=64, d_out=8192, k=4),
        inplace=dict(N=32, T=512, d_in=4096, d_out=4096, k=4, blocks=8),
        ties=dict(C=1_000_000, d=768, Q=32),
        warmup=dict(lora=(4096, 4096, 4), key_dim=768),
        e2e=dict(
            n_embd=1024, n_layer=24, n_head=16, batch=32, seq=128, edits=10_000, rounds=11, calls=3, edit_iters=10
        ),
        compile=dict(
            lora=((4096, 4096, 4), (14336, 4096, 8), (64, 8192, 4), (1024, 4096, 4)),
            key_dims=(768, 8192),
            dtypes=("bfloat16", "float16", "float32"),
        ),
    ),
    "dry": dict(
        lookup=dict(C=100, d=16, Q=(4, 1)),
        cdist=dict(C=100, d=16, Q=4),
        addon=dict(N=4, T=8, d_in=32, d_out=32, k=4, blocks=4),
        decode=dict(N=4, T=1, d_in=32, d_out=32, k=4, blocks=4),
        train=(dict(N=1, T=20, d_in=48, d_out=32, k=8), dict(N=3, T=8, d_in=32, d_out=32, k=4)),
        big_search=dict(C=100, d=16, Q=6),
        big_lora=dict(N=1, T=40, d_in=16, d_out=32, k=4),
        inplace=dict(N=4, T=8, d_in=32, d_out=32, k=4, blocks=3),
        ties=dict(C=100, d=16, Q=4),
        warmup=dict(lora=(32, 32, 4), key_dim=16),
        e2e=dict(n_embd=32, n_layer=2, n_head=2, batch=2, seq=6, edits=50, rounds=2, calls=1, edit_iters=1),
        # one variant per kernel, the one with the larger tiles (compiling takes ~1.5 s each on a small CPU)
        compile=dict(lora=((4096, 4096, 4),), key_dims=(768,), dtypes=("float32",), one_per_kernel=True),
    ),
}


# ---------------------------------------------------------------------------------------------
# Rows, checks, run context
# ---------------------------------------------------------------------------------------------

FAILED = ("FAIL", "ERROR")


@dataclasses.dataclass
class Row:
    """One line of the report. ``verdict``: pass / FAIL / ERROR / n/a / not run for checks;
    met / not met / dry run for targets; "" for information."""

    check: str
    section: str  # "correctness", "compile", "target", "info"
    what: str
    figure: str = ""
    target: str = ""
    verdict: str = ""
    note: str = ""
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Check:
    name: str
    section: str
    cost_s: float  # rough GPU seconds, for the budget
    fn: object
    doc: str


CHECKS: list[Check] = []


def check(section: str, cost_s: float):
    """Register a check (run in definition order)."""

    def register(fn):
        CHECKS.append(Check(fn.__name__.removeprefix("check_"), section, cost_s, fn, (fn.__doc__ or "").strip()))
        return fn

    return register


class Ctx:
    """What every check needs: device, sizes, budget, timer."""

    def __init__(self, dry: bool, budget_s: float):
        import torch

        self.dry = dry
        self.torch = torch
        self.device = torch.device("cpu" if dry else "cuda")
        self.sizes = SIZES["dry" if dry else "gpu"]
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.copy_bandwidth: float | None = None  # bytes/s, measured by check_environment
        self.background: dict[str, subprocess.Popen] = {}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def nominal_bandwidth(self) -> tuple[float | None, str]:
        """(bytes/s, where it comes from) for the floors of the targets."""
        if not self.dry:
            name = self.torch.cuda.get_device_name()
            for key, value in NOMINAL_BANDWIDTH.items():
                if key in name:
                    return value, f"{key} nominal {value / 1e12:.2f} TB/s"
        if self.copy_bandwidth:
            return self.copy_bandwidth, f"measured copy {self.copy_bandwidth / 1e12:.3f} TB/s"
        return None, "unknown"

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def time_ms(self, fn, grad_to_none=None) -> float:
        """Median milliseconds of ``fn()``: do_bench on CUDA (warm-up excluded, L2 flushed); the CPU
        (dry run) takes the median of three calls after one warm-up."""
        if self.device.type == "cuda":
            import triton.testing

            return float(
                triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
            )
        fn()
        times = []
        for _ in range(3):
            if grad_to_none:
                for tensor in grad_to_none:
                    tensor.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def time_ms_graph(self, fn) -> float:
        """Median milliseconds of ``fn`` replayed from a CUDA graph (no launch gaps; CUDA only)."""
        import triton.testing

        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def rel_l2(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp64 (NaN never passes a ≤ comparison)."""
    diff = (actual.double() - expected.double()).norm().item()
    return diff / max(expected.double().norm().item(), 1e-300)


def bits(tensor):
    import torch

    return tensor.view({torch.float32: torch.int32, torch.float64: torch.int64}.get(tensor.dtype, torch.int16))


def verdict(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def target_verdict(ctx: Ctx, met: bool) -> str:
    return "dry run" if ctx.dry else ("met" if met else "not met")


def fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.3f} ms"


def singleton_db(centers, radius: float, blocks=None):
    """``ops.vecdb_search`` tensors for one cluster per center (the point is the center itself)."""
    import torch

    n, device = centers.shape[0], centers.device
    radii = torch.full((n,), radius, device=device)
    offsets = torch.arange(n + 1, device=device)
    blocks = torch.arange(n, device=device) if blocks is None else blocks
    return centers, radii, offsets, centers, blocks


def lora_inputs(ctx: Ctx, N, T, d_in, d_out, k, blocks=1, dtype=None, ids=None, seed=0):
    """Random ``block_lora`` inputs: LoRA term of the same size as ``base`` (errors in it show)."""
    torch = ctx.torch
    dtype = dtype or torch.bfloat16
    g = torch.Generator(device=ctx.device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=ctx.device) * scale).to(dtype)

    x = randn(N, T, d_in)
    A = randn(blocks, k, d_in, scale=d_in**-0.5)
    B = randn(blocks, k, d_out, scale=k**-0.5)
    base = randn(N, T, d_out)
    if ids is None:
        ids = torch.arange(N, device=ctx.device) % blocks
    return x, A, B, base, ids


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


@check("info", 5)
def check_environment(ctx: Ctx) -> list[Row]:
    """Device, versions, and the two ceilings: device-to-device copy bandwidth, bf16 GEMM rate."""
    torch = ctx.torch
    n = (1 << 30) if not ctx.dry else (1 << 22)  # bytes per buffer
    src = torch.empty(n // 4, dtype=torch.float32, device=ctx.device).uniform_()
    dst = torch.empty_like(src)
    ms = ctx.time_ms(lambda: dst.copy_(src))
    ctx.copy_bandwidth = 2 * n / (ms * 1e-3)  # bytes read + written
    size = 8192 if not ctx.dry else 128
    a = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)
    b = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)
    gemm_ms = ctx.time_ms(lambda: a @ b)
    flops = 2 * size**3 / (gemm_ms * 1e-3)
    bandwidth, source = ctx.nominal_bandwidth()
    return [
        Row(
            "environment",
            "info",
            "device-to-device copy (bytes read + written)",
            f"{ctx.copy_bandwidth / 1e12:.3f} TB/s",
            data=dict(copy_bytes_per_s=ctx.copy_bandwidth),
        ),
        Row("environment", "info", f"bf16 GEMM {size}³", f"{flops / 1e12:.1f} TFLOP/s", data=dict(gemm_flops=flops)),
        Row("environment", "info", "bandwidth used for the floors", source, data=dict(floor_bandwidth=bandwidth)),
    ]


# ---------------------------------------------------------------------------------------------
# Correctness: what the unit tests cannot reach
# ---------------------------------------------------------------------------------------------


@check("correctness", 25)
def check_big_search(ctx: Ctx) -> list[Row]:
    """Lookup with element offsets past 2³¹: C = 270k centers of d = 8192 in bf16, queried near
    centers above index 2³¹ / d = 262,144 (and below)."""
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
    from benchmarks.gpu_stages import compile_report

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


# ---------------------------------------------------------------------------------------------
# Targets (the GPU-run issue's table), timed side by side
# ---------------------------------------------------------------------------------------------


@check("target", 15)
def check_lookup(ctx: Ctx) -> list[Row]:
    """Lookup C = 1M, d = 768, fp32 and bf16 centers: ≤ 2× the HBM floor (one pass over the centers),
    for a batch of 32 queries and for a single one."""
    torch, ops = ctx.torch, _ops()
    s = ctx.sizes["lookup"]
    bandwidth, source = ctx.nominal_bandwidth()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator(device=ctx.device).manual_seed(4)
        centers = torch.randn(s["C"], s["d"], generator=g, device=ctx.device).to(dtype)
        db = singleton_db(centers, 0.25 * s["d"] ** 0.5)
        for n_queries in s["Q"]:
            queries = (centers[:n_queries].float() + 0.01).to(dtype)
            ms = ctx.time_ms(lambda q=queries, db=db: ops.vecdb_search(q, *db, backend="triton"))
            bytes_read = (s["C"] + n_queries) * s["d"] * centers.element_size()
            floor_ms = bytes_read / bandwidth * 1e3
            name = str(dtype).removeprefix("torch.")
            rows.append(
                Row(
                    f"lookup_{'fp32' if dtype == torch.float32 else 'bf16'}",
                    "target",
                    f"lookup C={s['C']:,} d={s['d']} {name} centers, Q={n_queries}",
                    f"{fmt_ms(ms)} = {ms / floor_ms:.2f}× floor ({fmt_ms(floor_ms)}); "
                    f"{bytes_read / (ms * 1e-3) / 1e9:.0f} GB/s",
                    "≤ 2× floor",
                    target_verdict(ctx, ms <= 2 * floor_ms),
                    f"floor: {source}",
                    data=dict(ms=ms, floor_ms=floor_ms, bytes=bytes_read, Q=n_queries),
                )
            )
    return rows


@check("target", 10)
def check_lookup_vs_cdist(ctx: Ctx) -> list[Row]:
    """Lookup vs ``torch.cdist`` + min + radius mask, C = 100k: ≥ 3× faster."""
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
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
    torch, ops = ctx.torch, _ops()
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


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


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

    try:
        from benchmarks._common import fill_edits
    except ImportError:  # benchmarks/ is the script's own folder
        from _common import fill_edits

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


# ---------------------------------------------------------------------------------------------
# The unit tests and the memory checker (after the targets: the longest, and the budget's first cut)
# ---------------------------------------------------------------------------------------------


@check("correctness", 150)
def check_unit_tests(ctx: Ctx) -> list[Row]:
    """The Triton and ops unit tests on this device (compiled kernels vs the reference, every dtype)."""
    files = ["tests/test_ops_triton.py", "tests/test_ops.py"]
    args = ["-k", "test_search_empty_database"] if ctx.dry else []  # the dry run checks the plumbing
    timeout = max(ctx.remaining() - 70, 10)  # leave time for the sanitizer, the compile report and the report
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *args]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [
            Row(
                "unit_tests",
                "correctness",
                " ".join(files),
                verdict="not run",
                note=f"stopped after {timeout:.0f} s (budget)",
            )
        ]
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return [
        Row(
            "unit_tests",
            "correctness",
            " ".join(files) + (" (subset)" if ctx.dry else ""),
            summary,
            "all pass",
            verdict(done.returncode == 0),
            "; ".join(failures[:8]) or done.stderr[-500:],
            # The failures' tracebacks: a device run is short and costly, so keep what explains them.
            data=dict(output_tail=done.stdout[-6000:] if done.returncode else ""),
        )
    ]


@check("correctness", 50)
def check_sanitizer(ctx: Ctx) -> list[Row]:
    """``compute-sanitizer --tool memcheck`` on small search and block LoRA cases (where it works)."""
    tool = shutil.which("compute-sanitizer")
    cases = [sys.executable, str(Path(__file__).resolve()), "--sanitizer-cases"] + (["--dry-run"] if ctx.dry else [])
    command = cases if tool is None else [tool, "--tool", "memcheck", "--error-exitcode", "99", *cases]
    timeout = max(min(ctx.remaining() - 15, 150), 5)
    # Without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end instead of landing in a cached neighbour.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [
            Row(
                "sanitizer",
                "correctness",
                "compute-sanitizer memcheck",
                verdict="not run",
                note=f"stopped after {timeout:.0f} s",
            )
        ]
    output = done.stdout + done.stderr
    if tool is None:
        return [
            Row(
                "sanitizer",
                "correctness",
                "compute-sanitizer memcheck",
                "cases ran without it: " + ("ok" if done.returncode == 0 else "FAILED"),
                "0 errors",
                "n/a" if done.returncode == 0 else "FAIL",
                "compute-sanitizer not installed",
                data=dict(output=output[-2000:]),
            )
        ]
    if "Device not supported" in output or "error 999" in output.lower():
        return [
            Row(
                "sanitizer",
                "correctness",
                "compute-sanitizer memcheck",
                verdict="n/a",
                note="the sanitizer does not support this machine (e.g. gVisor)",
                data=dict(output=output[-2000:]),
            )
        ]
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    errors = int(summary[-1]) if summary else -1
    return [
        Row(
            "sanitizer",
            "correctness",
            "compute-sanitizer memcheck, small cases (fp32, bf16)",
            f"{errors} errors" if errors >= 0 else "no summary",
            "0 errors",
            verdict(done.returncode == 0 and errors == 0),
            output[-300:].replace("\n", " ⏎ "),
            data=dict(output=output[-4000:]),
        )
    ]


def sanitizer_cases_main(dry: bool) -> None:
    """``--sanitizer-cases``: small search and block LoRA calls (forward, backward, in place)."""
    import torch

    ops = _ops()
    device = torch.device("cpu" if dry else "cuda")
    g = torch.Generator(device=device).manual_seed(3)
    centers_n, queries_n, tokens = (30, 3, 5) if dry else (300, 20, 37)  # the interpreter is slow
    for dtype in (torch.float32, torch.bfloat16):
        centers = torch.randn(centers_n, 40, generator=g, device=device).to(dtype)
        queries = (centers[:queries_n].float() + 0.01).to(dtype)
        ids = ops.vecdb_search(queries, *singleton_db(centers, 3.0), backend="triton")
        assert torch.equal(ids.cpu(), torch.arange(queries_n)), ids
        x = torch.randn(5, tokens, 40, generator=g, device=device).to(dtype).requires_grad_()
        A = torch.randn(3, 4, 40, generator=g, device=device).to(dtype).requires_grad_()
        B = torch.randn(3, 4, 72, generator=g, device=device).to(dtype).requires_grad_()
        block_ids = torch.tensor([2, -1, 0, 2, 1], device=device)
        base = torch.randn(5, tokens, 72, generator=g, device=device).to(dtype)
        out = ops.block_lora(x, A, B, block_ids, 2.0, base, backend="triton")
        out.backward(torch.ones_like(out))
        with torch.no_grad():
            ops.block_lora(x, A, B, block_ids, 2.0, base.clone(), backend="triton", inplace=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("sanitizer cases done")


# ---------------------------------------------------------------------------------------------
# Compile: production variants for sm_90 (CPU, in the background) and the driver's spill report
# ---------------------------------------------------------------------------------------------


def compile_report_main(sizes: dict, out_path: str) -> None:
    """``--compile-report``: runs with TRITON_INTERPRET=0 (real @triton.jit kernels, compiled for sm_90
    on the CPU). Records the launches of ``warmup`` for the run's layer shapes and of a serving
    sweep, counts the variants the sweep needs beyond the warm-up (Triton's own binder), and
    compiles every warm-up variant, keeping ptxas's resource report."""
    import torch

    from benchmarks.gpu_stages import compile_report
    from melo_fast.ops.triton._launch import record_launches
    from melo_fast.ops.triton.warmup import warmup

    cpu = torch.device("cpu")
    dtypes = [getattr(torch, name) for name in sizes["dtypes"]]
    with record_launches(execute=False, as_gpu=True) as warm:
        for dtype in dtypes:
            warmup(cpu, sizes["lora"], dtype=dtype)
            for key_dim in sizes["key_dims"]:
                warmup(cpu, (), key_dim=key_dim, key_dtype=dtype)
    small_lora, small_key = (64, 48, 4), 32
    with record_launches(execute=False, as_gpu=True) as warm_small:
        for dtype in dtypes:
            warmup(cpu, [small_lora], key_dim=small_key, dtype=dtype)
    with record_launches(execute=False, as_gpu=True) as serving:
        compile_report.serving_sweep(small_lora, small_key, dtypes, cpu)
    warm_keys = {compile_report.variant_key(launch) for launch in warm_small}
    extra = sorted(
        {compile_report.describe(launch) for launch in serving if compile_report.variant_key(launch) not in warm_keys}
    )
    variants = {}
    for launch in warm:
        key = launch.name if sizes.get("one_per_kernel") else compile_report.variant_key(launch)
        variants[key] = launch  # the last one: warm-up goes from small tiles to large
    reports = []
    for launch in variants.values():
        _, resources = compile_report.compile_launch(launch)
        reports.append(dict(variant=compile_report.describe(launch), **resources))
    import triton

    result = dict(
        triton=triton.__version__,
        variants=reports,
        serving_launches=len(serving),
        warm_variants=len(warm_keys),
        not_warmed=extra,
    )
    Path(out_path).write_text(json.dumps(result, indent=1))


def _compile_report_path(ctx: Ctx, out: Path) -> Path:
    return out / "compile_report.json"


def start_compile_report(ctx: Ctx, out: Path) -> None:
    """Start the CPU-only compile report in a subprocess now; :func:`check_compile` collects it."""
    path = _compile_report_path(ctx, out)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--compile-report", str(path)]
    if ctx.dry:
        command.append("--dry-run")
    log = open(out / "compile_report.log", "w")  # noqa: SIM115 - closed when the process is collected
    ctx.background["compile"] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    ctx.background["compile"].log = log


@check("compile", 2)  # only collects: the report was started in the background
def check_compile(ctx: Ctx) -> list[Row]:
    """Every warm-up variant of the run's layer shapes compiled for sm_90 (ptxas report: no spills);
    a serving sweep needs no variant beyond the warm-up (Triton's binder, sm_90 target)."""
    process = ctx.background.get("compile")
    if process is None:
        return [Row("compile", "compile", "compile report", verdict="not run", note="not started")]
    try:
        process.wait(timeout=max(ctx.remaining(), 1))
    except subprocess.TimeoutExpired:
        process.kill()
        return [Row("compile", "compile", "compile report", verdict="not run", note="budget ran out")]
    process.log.close()
    out = Path(process.log.name).parent
    if process.returncode != 0:
        tail = (out / "compile_report.log").read_text()[-1500:]
        return [Row("compile", "compile", "compile report", verdict="ERROR", note=tail.replace("\n", " ⏎ "))]
    report = json.loads(_compile_report_path(ctx, out).read_text())
    variants = report["variants"]
    spilling = [v for v in variants if v["spill_store_bytes"] or v["spill_load_bytes"] or v["stack_frame_bytes"]]
    worst = max(variants, key=lambda v: v["registers"])
    ptxas = sorted({v["ptxas"] for v in variants})
    rows = [
        Row(
            "compile",
            "compile",
            f"{len(variants)} production variants for sm_90 (Triton {report['triton']}, "
            f"{', '.join(ptxas)}): bytes spilled",
            f"{len(spilling)} variants spill; max {worst['registers']} registers ({worst['variant']})",
            "0 spills",
            verdict(not spilling),
            "; ".join(f"{v['variant']}: {v['spill_store_bytes']} B" for v in spilling),
            data=report,
        ),
        Row(
            "compile",
            "compile",
            f"serving sweep ({report['serving_launches']} launches: growing bank and "
            f"database, decode, new batch sizes) vs warm-up ({report['warm_variants']} variants)",
            f"{len(report['not_warmed'])} variants not warmed up",
            "0",
            verdict(not report["not_warmed"]),
            "; ".join(report["not_warmed"][:5]),
        ),
    ]
    return rows


@check("compile", 2)
def check_runtime_spills(ctx: Ctx) -> list[Row]:
    """Registers and spills the driver reports for every kernel variant this run compiled (CUDA only;
    last, so that it sees every variant the other checks compiled)."""
    if ctx.device.type != "cuda":
        return [
            Row(
                "runtime_spills",
                "compile",
                "driver-reported spills of the variants compiled here",
                verdict="n/a",
                note="dry run: nothing compiled",
            )
        ]
    kernels = compiled_kernels()
    spilling = [(name, k.n_spills) for name, k in kernels if getattr(k, "n_spills", 0)]
    regs = max((getattr(k, "n_regs", 0) for _, k in kernels), default=0)
    return [
        Row(
            "runtime_spills",
            "compile",
            f"driver report of the {len(kernels)} variants compiled so far",
            f"{len(spilling)} spill; max {regs} registers",
            "0 spills",
            verdict(not spilling),
            "; ".join(f"{n}: {s}" for n, s in spilling),
        )
    ]


def _kernel_functions():
    from melo_fast.ops.triton import block_lora, vecdb_search

    return [
        getattr(m, n) for m in (block_lora, vecdb_search) for n in dir(m) if n.startswith("_") and n.endswith("_kernel")
    ]


def compiled_kernels() -> list[tuple[str, object]]:
    """(kernel name, compiled kernel) for every variant in Triton's in-memory caches (Triton 3.x)."""
    found = []
    for fn in _kernel_functions():
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            raise RuntimeError("this Triton keeps no device_caches on its kernels; cannot count compilations")
        for entry in caches.values():
            found += [(fn.fn.__name__, kernel) for kernel in entry[0].values()]
    return found


# ---------------------------------------------------------------------------------------------
# Runner and report
# ---------------------------------------------------------------------------------------------


def _ops():
    from melo_fast import ops

    return ops


def versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    import melo_fast

    found["melo_fast"] = melo_fast.__version__
    try:
        found["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        found["commit"] = "unknown"
    return found


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    """The two tables: checks (correctness, compile, information), then the targets."""
    head = (
        f"GPU check on {report['device']} ({', '.join(f'{k} {v}' for k, v in report['versions'].items())}); "
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget; exit status {report['exit_status']}"
    )
    if report["dry_run"]:
        head = (
            "DRY RUN on the CPU (Triton interpreter, tiny shapes): timings are CPU figures of tiny problems, "
            "not GPU figures.\n" + head
        )
    lines = [head, "", "| check | what | result | expected | verdict | note |", "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["section"] != "target":
            lines.append(
                "| "
                + " | ".join(_cell(row[k]) for k in ("check", "what", "figure", "target", "verdict", "note"))
                + " |"
            )
    lines += ["", "| target (GPU-run issue) | figure | target | verdict | note |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["section"] == "target":
            lines.append(
                "| " + " | ".join(_cell(row[k]) for k in ("what", "figure", "target", "verdict", "note")) + " |"
            )
    return "\n".join(lines) + "\n"


def exit_status(rows: list[Row], selected_all: bool) -> int:
    if any(row.verdict in FAILED for row in rows):
        return 1
    if any(row.verdict == "not run" for row in rows) or not selected_all:
        return 2
    return 0


def run(args) -> int:
    ctx = Ctx(args.dry_run, args.budget_s)
    torch = ctx.torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selected = [c for c in CHECKS if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in CHECKS}
    if unknown:
        raise SystemExit(f"gpu_check: unknown check(s) {sorted(unknown)}; --list shows the names")
    if any(c.name == "compile" for c in selected):
        start_compile_report(ctx, out)  # CPU-only: runs beside the GPU checks
    rows: list[Row] = []
    # The environment check measures the copy bandwidth that floors fall back on: keep it first.
    for item in selected:
        if ctx.remaining() < (item.cost_s if not ctx.dry else 0):
            rows.append(
                Row(
                    item.name,
                    item.section,
                    item.doc.split("\n")[0],
                    verdict="not run",
                    note=f"budget: {ctx.remaining():.0f} s left, needs ~{item.cost_s:.0f} s",
                )
            )
            print(f"[gpu_check] {item.name}: not run (budget)", flush=True)
            continue
        start = time.monotonic()
        try:
            new_rows = item.fn(ctx)
        except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
            new_rows = [
                Row(
                    item.name,
                    item.section,
                    item.doc.split("\n")[0],
                    verdict="ERROR",
                    note=f"{type(err).__name__}: {err}"[:500],
                    data=dict(traceback=traceback.format_exc()),
                )
            ]
        for row in new_rows:
            row.data.setdefault("seconds", round(time.monotonic() - start, 2))
        rows += new_rows
        print(
            f"[gpu_check] {item.name}: {', '.join(r.verdict or 'info' for r in new_rows)} "
            f"({time.monotonic() - start:.1f} s)",
            flush=True,
        )
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    for process in ctx.background.values():  # a check that was not run leaves its process behind
        if process.poll() is None:
            process.kill()
    status = exit_status(rows, selected_all=len(selected) == len(CHECKS))
    report = dict(
        device=torch.cuda.get_device_name() if ctx.device.type == "cuda" else f"CPU ({platform.machine()})",
        dry_run=ctx.dry,
        budget_s=args.budget_s,
        elapsed_s=time.monotonic() - ctx.start,
        versions=versions(),
        exit_status=status,
        rows=[dataclasses.asdict(row) for row in rows],
    )
    table = markdown(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(table)
    print("\n" + table, flush=True)
    return status


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget in seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument(
        "--only",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        help="comma-separated check names (see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list the checks in run order and exit")
    parser.add_argument("--compile-report", metavar="JSON", help=argparse.SUPPRESS)  # internal: the compile subprocess
    parser.add_argument("--sanitizer-cases", action="store_true", help=argparse.SUPPRESS)  # internal
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for item in CHECKS:
            print(f"{item.name:28s} {item.section:12s} {item.doc.splitlines()[0]}")
        return 0
    if args.dry_run and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    if args.compile_report:
        compile_report_main(SIZES["dry" if args.dry_run else "gpu"]["compile"], args.compile_report)
        return 0
    if args.sanitizer_cases:
        sanitizer_cases_main(args.dry_run)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
