"""What every stage of the GPU check shares: the sizes, the report's rows, the check registry, the run context.

A check is a function ``ctx -> list[Row]`` registered with :func:`check`; ``benchmarks/gpu_check.py`` runs
the registered checks stage by stage (its ``STAGES``), each stage in the order its checks are defined.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The entry point: the sanitizer and the compile report run it again in a subprocess, with an internal flag.
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# Nominal HBM bandwidth (bytes/s) by device name: the "floor" of a memory-bound op is its
# bytes over this. Other devices use the copy bandwidth measured in the run.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}

# Problem sizes: the GPU run, and the dry run (same code, tiny shapes).
SIZES = {
    "gpu": dict(
        lookup=dict(C=(1_000, 100_000, 1_000_000), d=768, Q=(32, 1)),  # the GPU-run issue's 1k/100k/1M keys
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
        lookup=dict(C=(10, 100), d=16, Q=(4, 1)),
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


REGISTERED: list[Check] = []


def check(section: str, cost_s: float):
    """Register a check of the stage (module) that defines it; see :func:`stage_checks`."""

    def register(fn):
        REGISTERED.append(Check(fn.__name__.removeprefix("check_"), section, cost_s, fn, (fn.__doc__ or "").strip()))
        return fn

    return register


def stage_checks(stage) -> list[Check]:
    """The checks the module ``stage`` registered, in the order it defines them. (The order of the stages
    is the entry point's, not the order of their imports: a stage may import another.)"""
    return [item for item in REGISTERED if item.fn.__module__ == stage.__name__]


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


def load_ops():
    """``melo_fast.ops``, imported when a check runs: the entry point sets TRITON_INTERPRET first."""
    from melo_fast import ops

    return ops


def versions() -> dict:
    """The report's software versions and the commit of the source tree."""
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
