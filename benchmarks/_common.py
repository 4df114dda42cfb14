"""Helpers shared by the layer, end-to-end, editing and scaling benchmarks.

(The ops suite, ``test_bench_ops.py``, has its own fixture in ``conftest.py``; both write the same
``extra_info`` keys where they overlap: ``backend``, ``device``, ``torch``, ``dtype``, ``op``, ``Q``,
``d``, ``C``.) Conventions used by ``report.py``:

- ``extra_info["case"]``: the row label inside the group; ``extra_info["baseline"]``: the ``case``
  every row of the group is compared with (ratios are ``baseline time / row time``: > 1 = faster).
- ``extra_info["plot"]``, ``"x"``, ``"series"``: a point of a scaling curve.
- ``extra_info["tokens"]``: tokens processed per call (the report adds tokens/s);
  ``extra_info["new_tokens"]``: tokens generated per call (the report adds ms/token).

Environment knobs: ``MELO_BENCH_DEVICE`` (cpu/cuda; default cuda when available) and
``MELO_BENCH_THREADS`` (torch intra-op threads; default torch's own choice).
"""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from pathlib import Path

import pytest
import torch

import melo_fast
from melo_fast import ops
from melo_fast.vecdb import VectorDatabase

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZERS = SHARED / "assets" / "tokenizers"
# Everything that can change a figure: the package, its C++ kernels and build, and the suites (not
# their outputs, which an earlier run may have left modified).
MEASURED_PATHS = ("melo_fast", "csrc", "setup.py", "pyproject.toml", "benchmarks", ":(exclude)benchmarks/results.json",
                  ":(exclude)benchmarks/long_run.json", ":(exclude)benchmarks/bank_memory.json",
                  ":(exclude)benchmarks/plots")

DEVICE = os.environ.get("MELO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if os.environ.get("MELO_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MELO_BENCH_THREADS"]))

# Backends compared per device type: Triton only on CUDA (its CPU interpreter is a test tool), the
# C++ extension only on CPU.
CANDIDATES = {"cpu": ("reference", "torch", "cpp"), "cuda": ("reference", "torch", "triton")}


def sync() -> None:
    """Wait for queued device work (called inside every timed function)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name(device: str = DEVICE) -> str:
    """CPU model or GPU name, with the torch thread count (recorded with every result)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "melo_fast": melo_fast.__version__}
    for name in ("transformers", "peft"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    return found


def available_backends() -> list[str]:
    status = ops.backend_status()
    return [name for name in CANDIDATES[DEVICE.split(":")[0]] if status.get(name) == "available"]


def backend_params(include_reference: bool = True):
    """pytest params for the candidate backends of DEVICE; unavailable ones are skips saying why."""
    status = ops.backend_status()
    params = []
    for name in CANDIDATES[DEVICE.split(":")[0]]:
        if name == "reference" and not include_reference:
            continue
        marks = [] if status.get(name) == "available" else [pytest.mark.skip(reason=f"{name}: {status.get(name)}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def default_backend() -> str:
    """The backend ``backend=None`` resolves to on DEVICE (what a user gets without choosing)."""
    preferred = {"cpu": "cpp", "cuda": "triton"}.get(DEVICE.split(":")[0])
    return preferred if preferred in available_backends() else "torch"


def _jsonable(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def bench(benchmark, fn, *, group, case, baseline, target_s=2.0, min_rounds=3, max_rounds=30, warmup=1,
          setup=None, paired=None, count_faults=False, **info) -> float:
    """Time ``fn`` (device-synchronized) under ``group`` and record where, what and how.

    Rounds are chosen from one warm-up call so that the case takes about ``target_s``
    (``min_rounds``..``max_rounds``; 1 when one call takes over 4x ``target_s``); ``warmup=0``
    (the slow reference path) runs exactly ``min_rounds`` rounds. ``setup`` (untimed) runs before
    every round. Returns the min seconds.

    ``paired`` (optional ``(case, fn)``): a baseline timed (same timer, untimed by pytest-benchmark)
    right before every round of ``fn``, so the two alternate; its times go to
    ``extra_info["paired"]`` (in round order, matching ``stats.data``) and the report gives the median
    of the per-round ratios, which machine-load drift between rows cannot bias.

    ``count_faults``: also count the minor page faults of every timed call (``getrusage``, two
    system calls per round: only for cases of milliseconds or more) and record their median as
    ``extra_info["minor_faults_per_call"]``: how much fresh memory a call touches (4 KiB per fault
    with ordinary pages).
    """
    timer = getattr(benchmark, "_timer", None) or time.perf_counter
    paired_times: list[float] = []

    def run_paired():
        if paired is not None:
            start = timer()
            paired[1]()
            sync()
            paired_times.append(timer() - start)

    def before_round():
        if setup is not None:
            setup()
        run_paired()

    faults: list[int] = []

    def timed():
        if not count_faults:
            result = fn()
            sync()
            return result
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        result = fn()
        sync()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return result

    benchmark.group = group
    benchmark.extra_info.update(
        case=case,
        baseline=baseline,
        device=device_name(),
        device_type=DEVICE,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        versions=versions(),
        **{key: _jsonable(value) for key, value in info.items()},
    )
    if info.get("backend") == "cpp":
        from melo_fast.ops import cpp

        benchmark.extra_info["isa"] = cpp.isa()
    rounds = min_rounds
    for _ in range(warmup):
        before_round()
        start = time.perf_counter()
        timed()
        estimate = time.perf_counter() - start
        rounds = max(min_rounds, min(max_rounds, int(target_s / max(estimate, 1e-6))))
        if estimate > 4 * target_s:
            rounds = 1  # a slow outlier (e.g. the torch backend at 1M keys): one round after the warm-up
    paired_times.clear()
    faults.clear()

    def pedantic_setup():
        before_round()
        return (), {}

    needs_setup = setup is not None or paired is not None
    benchmark.pedantic(timed, setup=pedantic_setup if needs_setup else None, rounds=rounds, iterations=1,
                       warmup_rounds=0)
    if paired_times:
        ordered = sorted(paired_times)
        benchmark.extra_info["paired"] = {"case": paired[0], "min": ordered[0], "median": ordered[len(ordered) // 2],
                                          "rounds": len(ordered), "times": paired_times}  # round order
    if faults:
        benchmark.extra_info["minor_faults_per_call"] = sorted(faults)[len(faults) // 2]
    return benchmark.stats.stats.min


# ---- synthetic databases and banks ---------------------------------------------------------------


def synthetic_vectors(n: int, dim: int, seed: int = 0, tile: int = 8192) -> torch.Tensor:
    """``[n, dim]`` float32 vectors, all far apart, entries ~ N(0, 1), on DEVICE.

    ``torch.randn`` of 1M x 768 takes ~10 s on a small CPU; rows here are a random tile plus a
    random shift per tile (one fused add), which is as good for a brute-force scan and ~10x faster.
    """
    g = torch.Generator().manual_seed(seed)
    if n <= tile:
        return torch.randn(n, dim, generator=g).to(DEVICE)
    tiles = math.ceil(n / tile)
    base = (torch.randn(tile, dim, generator=g) * 0.5**0.5).to(DEVICE)
    shifts = (torch.randn(tiles, dim, generator=g) * 0.5**0.5).to(DEVICE)
    out = torch.empty(tiles * tile, dim, device=DEVICE)
    torch.add(base[None], shifts[:, None], out=out.view(tiles, tile, dim))
    return out[:n]


def lookup_database(n_keys: int, dim: int, seed: int = 0):
    """Database tensors of ``n_keys`` singleton clusters, in ``ops.vecdb_search`` order.

    (centers, radii, offsets, points, blocks); ``points`` is the same tensor as ``centers`` (one
    point per cluster, at its center), as in the ops suite.
    """
    centers = synthetic_vectors(n_keys, dim, seed)
    radii = torch.full((n_keys,), 0.5 * dim**0.5, device=DEVICE)
    offsets = torch.arange(n_keys + 1, device=DEVICE)
    blocks = (torch.arange(n_keys) % 1000).to(DEVICE)
    return centers, radii, offsets, centers, blocks


def lookup_queries(centers: torch.Tensor, n_queries: int, seed: int = 1) -> torch.Tensor:
    """``[n_queries, d]`` queries: the first half near stored keys (hits), the rest random (misses)."""
    g = torch.Generator().manual_seed(seed)
    n_keys, dim = centers.shape
    picks = torch.randint(0, n_keys, (n_queries // 2,), generator=g).to(DEVICE)
    hits = centers[picks] + 0.01 * torch.randn(len(picks), dim, generator=g).to(DEVICE)
    misses = torch.randn(n_queries - len(picks), dim, generator=g).to(DEVICE)
    return torch.cat([hits, misses])


def synthetic_database(
    dim: int, n_keys: int, num_blocks: int, hits: torch.Tensor | None = None, radius: float = 0.5, seed: int = 0
) -> VectorDatabase:
    """A database of ``n_keys`` singleton clusters, built without running any edit.

    The tensors ``insert`` would build for keys that are all far apart: one cluster per key with
    radius ``radius``, CSR offsets ``0..n``, the point at the center, random blocks in
    ``[0, num_blocks)``. The first ``len(hits)`` keys are ``hits`` (e.g. the benchmark batch's own
    keys) routed to blocks ``0..len(hits)-1``, so those inputs hit an edit whatever the radius; the
    other keys are drawn with the mean and spread of ``hits`` per dimension (far from them).
    """
    n_hits = 0 if hits is None else hits.shape[0]
    if n_keys < n_hits:
        raise ValueError("synthetic_database: fewer keys than hits")
    centers = synthetic_vectors(n_keys, dim, seed)
    if n_hits > 1:
        centers.mul_(hits.float().std(0).clamp(min=1e-3).to(DEVICE)).add_(hits.float().mean(0).to(DEVICE))
    if n_hits:
        centers[:n_hits] = hits.float().to(DEVICE)
    g = torch.Generator().manual_seed(seed + 2)
    blocks = torch.randint(0, max(num_blocks, 1), (n_keys,), generator=g)
    blocks[:n_hits] = torch.arange(n_hits) % max(num_blocks, 1)
    tensors = {
        "centers": centers,
        "points": centers,
        "radii": torch.full((n_keys,), radius, device=DEVICE),
        "cluster_labels": torch.zeros(n_keys, dtype=torch.int64, device=DEVICE),
        "point_offsets": torch.arange(n_keys + 1, device=DEVICE),
        "point_blocks": blocks.to(DEVICE),
    }
    meta = {"dim": dim, "init_radius": radius, "labels": [[0]], "conflicts": 0, "forgotten": 0}
    return VectorDatabase.from_state_dict(tensors, meta, device=DEVICE)


def synthetic_blocks(editor, num_blocks: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``num_blocks`` trained-looking blocks for every target: random A (kaiming-like scale), small B."""
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for name, layer in editor.lora_layers.items():
        a = torch.randn(num_blocks, layer.rank, layer.d_in, generator=g) / layer.d_in**0.5
        b = torch.randn(num_blocks, layer.rank, layer.d_out, generator=g) * 1e-3
        blocks[name] = (a.to(DEVICE, layer.bank.dtype), b.to(DEVICE, layer.bank.dtype))
    return blocks


def fill_edits(editor, n_keys: int, num_blocks: int, hits: torch.Tensor | None = None, seed: int = 0):
    """Publish ``num_blocks`` synthetic blocks and an ``n_keys`` database in ``editor`` (no training).

    Returns ``(database, blocks)``, so a benchmark can publish the same state again with
    ``editor.replace_state(*returned)``.
    """
    database = synthetic_database(editor.db.dim, n_keys, num_blocks, hits, seed=seed)
    state = database, synthetic_blocks(editor, num_blocks, seed)
    editor.replace_state(*state)
    return state


# ---- memory ----------------------------------------------------------------------------------------


def release_free_memory() -> None:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim(0)``; elsewhere a no-op).

    Use it as the untimed ``setup`` of every round of cases that allocate large outputs: glibc serves
    a large allocation from free heap memory when an earlier case left some, and from fresh pages
    (a page fault each) otherwise, so without it a case's time depends on which cases ran before it.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_tensor_bytes(fn) -> int:
    """Peak bytes of live tensors allocated while ``fn()`` runs, above what was live before it.

    CPU: ``torch.profiler`` with ``profile_memory=True``; every allocation and free is an event with
    its size, and the running sum over events in time order gives live bytes (allocator caching and
    RSS noise do not enter). CUDA: ``torch.cuda.max_memory_allocated`` after a reset.
    """
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_rss() -> int:
    """The process's RSS high-water mark in bytes (Linux VmHWM, else ``ru_maxrss``)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
