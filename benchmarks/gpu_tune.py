"""Tile, precision and profile sweep of the Triton kernels on a GPU: the data behind their launch configurations.

    PYTHONPATH=. python benchmarks/gpu_tune.py --out DIR            # on a CUDA machine (~2 minutes)
    PYTHONPATH=. python benchmarks/gpu_tune.py --dry-run --out DIR  # anywhere: CPU, Triton interpreter, tiny shapes

``benchmarks/gpu_check.py`` says whether the kernels meet their targets; this script says why not and
what would: each kernel is timed under several launch configurations (the launchers' config functions
are swapped for each variant, so the variants run through the production launchers), every variant's
result is compared with the torch backend, and one forward+backward step and one end-to-end forward
are profiled per kernel. It writes ``gpu_tune.json`` to ``--out`` and prints one table per sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {
    "gpu": dict(
        lookup=dict(C=1_000_000, d=768, Q=(1, 32)),
        # (N, T, d_in, d_out, k, distinct blocks): the add-on and decode shapes of gpu_check.py, and GPT-2
        # medium's c_fc at the end-to-end batch.
        lora=dict(
            addon=(64, 128, 4096, 4096, 4, 64), decode=(64, 1, 4096, 4096, 4, 64), c_fc=(32, 128, 1024, 4096, 4, 32)
        ),
        train=dict(long=(1, 4096, 14336, 4096, 8), batch=(32, 128, 4096, 4096, 4)),
        e2e=dict(n_embd=1024, n_layer=24, n_head=16, batch=32, seq=128, edits=10_000, edit_iters=2),
    ),
    "dry": dict(
        lookup=dict(C=300, d=32, Q=(1, 5)),
        lora=dict(addon=(3, 20, 32, 48, 4, 3), decode=(3, 1, 32, 48, 4, 3), c_fc=(2, 20, 32, 64, 4, 2)),
        train=dict(long=(1, 40, 48, 32, 8), batch=(3, 8, 32, 32, 4)),
        e2e=dict(n_embd=32, n_layer=2, n_head=2, batch=2, seq=6, edits=50, edit_iters=1),
    ),
}

# Launch configurations tried per kernel on a GPU (the first of each list is the one the launchers used at
# commit 17d3c7c, before this sweep).
LOOKUP_VARIANTS = {
    "fp32": [
        dict(BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=2, DOT_PRECISION="ieee"),
        dict(BLOCK_C=128, BLOCK_D=32, num_warps=8, num_stages=3, DOT_PRECISION="tf32x3"),
        dict(BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3, DOT_PRECISION="tf32x3"),
        dict(BLOCK_C=256, BLOCK_D=32, num_warps=8, num_stages=3, DOT_PRECISION="tf32x3"),
        dict(BLOCK_C=64, BLOCK_D=64, num_warps=4, num_stages=3, DOT_PRECISION="tf32x3"),
        dict(BLOCK_C=128, BLOCK_D=32, num_warps=8, num_stages=3, DOT_PRECISION="tf32"),
    ],
    "bf16": [
        dict(BLOCK_C=128, BLOCK_D=32, num_warps=8, num_stages=3, DOT_PRECISION="ieee"),
        dict(BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3, DOT_PRECISION="ieee"),
        dict(BLOCK_C=256, BLOCK_D=64, num_warps=8, num_stages=3, DOT_PRECISION="ieee"),
        dict(BLOCK_C=128, BLOCK_D=64, num_warps=4, num_stages=4, DOT_PRECISION="ieee"),
    ],
}
SPLIT_FACTORS = (4, 8, 16)  # scan programs per SM (today: 4)
PROJECT_VARIANTS = [
    dict(BLOCK_T=16, BLOCK_D=128, num_warps=4),
    dict(BLOCK_T=32, BLOCK_D=128, num_warps=4),
    dict(BLOCK_T=64, BLOCK_D=128, num_warps=4),
    dict(BLOCK_T=64, BLOCK_D=128, num_warps=8),
    dict(BLOCK_T=64, BLOCK_D=256, num_warps=8),
    dict(BLOCK_T=128, BLOCK_D=64, num_warps=8),
    dict(BLOCK_T=64, BLOCK_D=128, num_warps=4, num_stages=4),
]
EXPAND_VARIANTS = [
    dict(BLOCK_T=64, BLOCK_D=128, num_warps=8),
    dict(BLOCK_T=64, BLOCK_D=256, num_warps=8),
    dict(BLOCK_T=128, BLOCK_D=128, num_warps=8),
    dict(BLOCK_T=32, BLOCK_D=256, num_warps=4),
    dict(BLOCK_T=128, BLOCK_D=256, num_warps=8),
    dict(BLOCK_T=64, BLOCK_D=64, num_warps=4),
]
DW_VARIANTS = [
    dict(BLOCK_T=64, BLOCK_D=128, BLOCK_N=64, num_warps=8),
    dict(BLOCK_T=128, BLOCK_D=128, BLOCK_N=64, num_warps=8),
    dict(BLOCK_T=64, BLOCK_D=64, BLOCK_N=64, num_warps=4),
    dict(BLOCK_T=128, BLOCK_D=64, BLOCK_N=64, num_warps=4),
    dict(BLOCK_T=64, BLOCK_D=256, BLOCK_N=64, num_warps=8),
]


class Bench:
    """Timing and device of one run: ``triton.testing.do_bench`` medians on CUDA, plain medians on the CPU."""

    def __init__(self, dry: bool):
        import torch

        self.torch = torch
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.sizes = SIZES["dry" if dry else "gpu"]

    def ms(self, fn) -> float:
        if not self.dry:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def sync(self) -> None:
        if not self.dry:
            self.torch.cuda.synchronize()


@contextlib.contextmanager
def swapped(module, name: str, replacement):
    """``module.name`` replaced by ``replacement`` inside the block (the launchers look it up per call)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def variants(dry: bool, gpu_list: list[dict]) -> list[dict | None]:
    """The configurations to try: on the CPU only today's (None: the launcher's own choice)."""
    return [None] if dry else gpu_list


def sweep_lookup(bench: Bench) -> list[dict]:
    """fp32 and bf16 centers, C = 1M: every scan configuration and split factor, ids checked against torch."""
    import melo_fast.ops.triton.vecdb_search as vs
    from melo_fast import ops

    torch = bench.torch
    s = bench.sizes["lookup"]
    rows = []
    g = torch.Generator(device=bench.device).manual_seed(0)
    centers32 = torch.randn(s["C"], s["d"], generator=g, device=bench.device)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        centers = centers32.to(dtype)
        n = centers.shape[0]
        radii = torch.full((n,), 0.25 * s["d"] ** 0.5, device=bench.device)
        db = (centers, radii, torch.arange(n + 1, device=bench.device), centers, torch.arange(n, device=bench.device))
        for q in s["Q"]:
            # Half the queries near a center (a hit), half random (a miss): both paths of the resolve kernel.
            near = centers32[torch.randint(0, n, (q,), generator=g, device=bench.device)] + 0.01
            queries = torch.where(torch.arange(q, device=bench.device)[:, None] % 2 == 0, near,
                                  torch.randn(q, s["d"], generator=g, device=bench.device)).to(dtype)  # fmt: skip
            expected = ops.vecdb_search(queries, *db, backend="torch")
            floor_ms = (n + q) * s["d"] * centers.element_size() / 4.8e12 * 1e3
            for config in variants(bench.dry, LOOKUP_VARIANTS[name]):
                for factor in (None,) if bench.dry else SPLIT_FACTORS:

                    def chosen(n_queries, n_centers, dim, dot_fp32, on_gpu, config=config):
                        base = ORIGINAL_SCAN_CONFIG(n_queries, n_centers, dim, dot_fp32, on_gpu)
                        return base if config is None else {**base, **config}

                    def programs(device, factor=factor):
                        return ORIGINAL_TARGET_PROGRAMS(device) if factor is None else factor * vs.sm_count(device)

                    with swapped(vs, "scan_config", chosen), swapped(vs, "_target_programs", programs):
                        try:
                            got = ops.vecdb_search(queries, *db, backend="triton")
                            ms = bench.ms(lambda q=queries, db=db: ops.vecdb_search(q, *db, backend="triton"))
                            error = ""
                        except Exception as err:  # noqa: BLE001 - a variant that does not compile is a finding
                            got, ms, error = None, float("nan"), f"{type(err).__name__}: {err}"[:200]
                    same = None if got is None else int((got == expected).sum())
                    rows.append(
                        dict(keys=name, Q=q, config=config or "launcher", split_factor=factor, ms=ms, floor_ms=floor_ms,
                             x_floor=ms / floor_ms, ids_equal=same, of=q, error=error)
                    )  # fmt: skip
    return rows


def sweep_lora(bench: Bench) -> list[dict]:
    """Inference add-on (in place): project and expand configurations timed separately, at three shapes."""
    import melo_fast.ops.triton.block_lora as bl
    from melo_fast import ops

    torch = bench.torch
    rows = []
    for shape_name, (N, T, d_in, d_out, k, blocks) in bench.sizes["lora"].items():
        x, A, B, base, ids = lora_inputs(bench, N, T, d_in, d_out, k, blocks)
        expected = ops.block_lora(x, A, B, ids, 2.0, base, backend="torch")
        h = torch.empty(N, T, bl.rank_tile(k), dtype=torch.float32, device=bench.device)
        for kernel, gpu_list, config_name in (("project", PROJECT_VARIANTS, "project_config"),
                                              ("expand", EXPAND_VARIANTS, "expand_config")):  # fmt: skip
            original = getattr(bl, config_name)
            for config in variants(bench.dry, gpu_list):

                def chosen(*args, config=config, original=original):
                    base_config = original(*args)
                    return base_config if config is None else {**base_config, **config}

                with swapped(bl, config_name, chosen), torch.no_grad():
                    try:
                        out = base.clone()
                        ops.block_lora(x, A, B, ids, 2.0, out, backend="triton", inplace=True)
                        error = rel_l2(out, expected)
                        if kernel == "project":
                            ms = bench.ms(lambda x=x, A=A, ids=ids, h=h: bl._project(x, A, ids, h, 1.0, h.shape[2]))
                        else:
                            bl._project(x, A, ids, h, 1.0, h.shape[2])
                            target = base.clone()
                            ms = bench.ms(lambda t=target, h=h, B=B, ids=ids: bl._expand(h, B, ids, t, t, 2.0, True))
                        failure = ""
                    except Exception as err:  # noqa: BLE001
                        ms, error, failure = float("nan"), float("nan"), f"{type(err).__name__}: {err}"[:200]
                bytes_moved = N * T * (d_in if kernel == "project" else 2 * d_out) * x.element_size()
                rows.append(dict(shape=shape_name, N=N, T=T, d_in=d_in, d_out=d_out, kernel=kernel,
                                 config=config or "launcher", ms=ms, floor_ms=bytes_moved / 4.8e12 * 1e3,
                                 rel_l2=error, error=failure))  # fmt: skip
    return rows


def sweep_dw(bench: Bench) -> list[dict]:
    """The weight-gradient kernel at the two training shapes, every configuration, checked against torch."""
    import melo_fast.ops.triton.block_lora as bl
    from melo_fast import ops

    torch = bench.torch
    rows = []
    for shape_name, (N, T, d_in, d_out, k) in bench.sizes["train"].items():
        x, A, B, base, ids = lora_inputs(bench, N, T, d_in, d_out, k, 1)
        grad = torch.randn_like(base)
        leaves = [t.detach().requires_grad_() for t in (x, A, B)]
        ops.block_lora(*leaves[:1], leaves[1], leaves[2], ids, 2.0, base, backend="torch").backward(grad)
        expected_A = leaves[1].grad.clone()
        _, h = bl.block_lora_fwd(x, A, B, ids, 2.0, base, store_h=True)
        dh = torch.empty_like(h)
        bl._project(grad, B, ids, dh, 2.0, dh.shape[2])
        for config in variants(bench.dry, DW_VARIANTS):

            def chosen(*args, config=config):
                base_config = ORIGINAL_DW_CONFIG(*args)
                return base_config if config is None else {**base_config, **config}

            with swapped(bl, "dw_config", chosen):
                grad_a = torch.empty_like(A)
                try:
                    bl._weight_grad(dh, x, ids, grad_a, 1.0)
                    error = rel_l2(grad_a, expected_A)
                    ms = bench.ms(lambda g=grad_a, dh=dh, x=x, ids=ids: bl._weight_grad(dh, x, ids, g, 1.0))
                    failure = ""
                except Exception as err:  # noqa: BLE001
                    ms, error, failure = float("nan"), float("nan"), f"{type(err).__name__}: {err}"[:200]
            floor_ms = N * T * d_in * x.element_size() / 4.8e12 * 1e3
            rows.append(
                dict(shape=shape_name, N=N, T=T, d_in=d_in, k=k, config=config or "launcher", ms=ms, floor_ms=floor_ms,
                     rel_l2=error, error=failure)
            )  # fmt: skip
    return rows


def host_overhead(bench: Bench) -> dict:
    """Host microseconds per call of each op at decode size (200 calls back to back, one sync at the end):
    what an eager decode step pays on the CPU side, where the GPU work is a few microseconds."""
    from melo_fast import ops

    torch = bench.torch
    N, T, d_in, d_out, k, blocks = bench.sizes["lora"]["decode"]
    x, A, B, base, ids = lora_inputs(bench, N, T, d_in, d_out, k, blocks)
    weight = torch.randn(d_out, d_in, device=bench.device).to(torch.bfloat16)
    centers = torch.randn(1000, 768, device=bench.device)
    db = (centers, torch.ones(1000, device=bench.device), torch.arange(1001, device=bench.device), centers,
          torch.arange(1000, device=bench.device))  # fmt: skip
    queries = centers[:N] + 0.01
    calls = {
        "linear (reference)": lambda: torch.nn.functional.linear(x, weight),
        "block_lora in place (dispatcher)": lambda: ops.block_lora(x, A, B, ids, 2.0, base, backend="triton",
                                                                   inplace=True),  # fmt: skip
        "vecdb_search 1k centers (dispatcher)": lambda: ops.vecdb_search(queries, *db, backend="triton"),
    }
    out = {}
    with torch.no_grad():
        for name, fn in calls.items():
            fn()
            bench.sync()
            start = time.perf_counter()
            for _ in range(200):
                fn()
            bench.sync()
            out[name] = round((time.perf_counter() - start) / 200 * 1e6, 1)
    return out


def kernel_profile(bench: Bench, fn, steps: int = 5) -> dict:
    """Device time per kernel name (µs per step) and host time per step of ``fn``, by torch.profiler."""
    torch = bench.torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    bench.sync()
    activities = [ProfilerActivity.CPU] + ([] if bench.dry else [ProfilerActivity.CUDA])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        bench.sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kernels = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if device_us and event.key and not event.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            kernels[event.key[:90]] = round(device_us / steps, 1)
    del torch
    top = dict(sorted(kernels.items(), key=lambda item: -item[1])[:25])
    return dict(wall_ms_per_step=wall_ms, device_us_per_step_total=round(sum(kernels.values()), 1), kernels=top)


def profile_training(bench: Bench) -> dict:
    """One forward+backward of the block LoRA (one block, the editing case) at each training shape."""
    from melo_fast import ops

    out = {}
    for shape_name, (N, T, d_in, d_out, k) in bench.sizes["train"].items():
        x, A, B, base, ids = lora_inputs(bench, N, T, d_in, d_out, k, 1)
        leaves = [t.requires_grad_() for t in (x, A, B, base)]
        grad = bench.torch.randn_like(base)

        def step(leaves=leaves, ids=ids, grad=grad):
            for leaf in leaves:
                leaf.grad = None
            ops.block_lora(leaves[0], leaves[1], leaves[2], ids, 2.0, leaves[3], backend="triton").backward(grad)

        out[shape_name] = kernel_profile(bench, step)
    return out


def profile_e2e(bench: Bench) -> dict:
    """GPT-2-medium shape, bf16, 10k edits, every sample hitting one: patched vs unpatched forward, by kernel."""
    from benchmarks.gpu_stages.context import Ctx
    from benchmarks.gpu_stages.end_to_end import build_edited_gpt2

    torch = bench.torch
    s = bench.sizes["e2e"]
    ctx = Ctx(bench.dry, budget_s=600)
    model, editor, batch = build_edited_gpt2(ctx, dict(s, rounds=1, calls=1))

    def patched():
        model(**batch)

    def unpatched():
        with editor.disabled():
            model(**batch)

    with torch.no_grad():
        return dict(patched=kernel_profile(bench, patched), unpatched=kernel_profile(bench, unpatched))


def lora_inputs(bench: Bench, N, T, d_in, d_out, k, blocks):
    """Random bf16 block LoRA inputs, sample ``n`` routed to block ``n % blocks``."""
    torch = bench.torch
    g = torch.Generator(device=bench.device).manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=bench.device) * scale).to(torch.bfloat16)

    x = randn(N, T, d_in)
    A, B = randn(blocks, k, d_in, scale=d_in**-0.5), randn(blocks, k, d_out, scale=k**-0.5)
    return x, A, B, randn(N, T, d_out), torch.arange(N, device=bench.device) % blocks


def rel_l2(actual, expected) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-300))


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_tune_out")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--only", default="host,lookup,lora,dw,train_profile,e2e_profile")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    global ORIGINAL_SCAN_CONFIG, ORIGINAL_TARGET_PROGRAMS, ORIGINAL_DW_CONFIG
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_tune: no CUDA device; use --dry-run", file=sys.stderr)
        return 1
    import melo_fast.ops.triton.block_lora as bl
    import melo_fast.ops.triton.vecdb_search as vs

    ORIGINAL_SCAN_CONFIG, ORIGINAL_TARGET_PROGRAMS = vs.scan_config, vs._target_programs
    ORIGINAL_DW_CONFIG = bl.dw_config
    bench = Bench(args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name() if not args.dry_run else "CPU (dry run)",
                  torch=torch.__version__)  # fmt: skip
    sweeps = dict(
        host=host_overhead, lookup=sweep_lookup, lora=sweep_lora, dw=sweep_dw, train_profile=profile_training,
        e2e_profile=profile_e2e,
    )
    for name in args.only.split(","):
        start = time.monotonic()
        try:
            report[name] = sweeps[name](bench)
        except Exception as err:  # noqa: BLE001 - one broken sweep must not hide the others
            import traceback

            report[name] = dict(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        print(f"[gpu_tune] {name}: {time.monotonic() - start:.1f} s", flush=True)
        (out / "gpu_tune.json").write_text(json.dumps(report, indent=1, default=str))
    if isinstance(report.get("lookup"), list):
        columns = ["keys", "Q", "config", "split_factor", "ms", "x_floor", "ids_equal", "error"]
        print_table("lookup", report["lookup"], columns)
    if isinstance(report.get("lora"), list):
        columns = ["shape", "kernel", "config", "ms", "floor_ms", "rel_l2", "error"]
        print_table("block LoRA add-on", report["lora"], columns)
    if isinstance(report.get("dw"), list):
        print_table("weight gradient", report["dw"], ["shape", "config", "ms", "floor_ms", "rel_l2", "error"])
    for name in ("host", "train_profile", "e2e_profile"):
        if name in report:
            print(f"\n## {name}\n\n" + json.dumps(report[name], indent=1)[:6000])
    return 0


ORIGINAL_SCAN_CONFIG = ORIGINAL_TARGET_PROGRAMS = ORIGINAL_DW_CONFIG = None

if __name__ == "__main__":
    sys.exit(main())
