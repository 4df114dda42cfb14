"""Op benchmarks: ``vecdb_search`` and ``block_lora`` for every backend available on the device.

    pytest -q benchmarks/test_bench_ops.py --benchmark-only                 # CPU set: a few minutes
    pytest -q benchmarks/test_bench_ops.py --benchmark-only -k cuda         # GPU set (needs CUDA)
    pytest -q benchmarks/test_bench_ops.py --benchmark-only -k "inplace or layer_inference"  # in place

The ``block_lora`` forward groups time the op alone, out of place and in place (``inplace=True``,
on a fresh copy of base made outside the timed region), next to ``nn.Linear`` alone. The ``layer
inference`` groups time the patched layer's inference path as it runs (``nn.Linear`` then the
add-on, out of place or in place) with ``nn.Linear`` alone timed right before every round: their
``extra_info["add-on / Linear"]`` is the median over rounds of (layer - Linear) / Linear.

Groups are op + shape, so backends sit side by side in the table; compare ratios within a group.
The reference backend (plain Python loops over the rules of DESIGN §1) runs a few pedantic rounds
only, and is left out where one call would take minutes (lookups above 10k centers).
"""

from __future__ import annotations

import time

import pytest
import torch

from melo_fast import ops

# Backends benchmarked per device type. Triton is CUDA-only here (its CPU interpreter is a test tool),
# and the C++ extension only takes CPU tensors.
_CANDIDATES = {"cpu": ("reference", "torch", "cpp"), "cuda": ("reference", "torch", "triton")}


def backend_params(device: str):
    """pytest params for every candidate backend; unavailable ones appear as skips saying why."""
    status = ops.backend_status()
    marks = [] if device == "cpu" or torch.cuda.is_available() else [pytest.mark.skip(reason="needs a CUDA device")]
    params = []
    for name in _CANDIDATES[device]:
        skip = [] if status.get(name) == "available" else [pytest.mark.skip(reason=f"{name}: {status.get(name)}")]
        params.append(pytest.param(name, marks=marks + skip, id=name))
    return params


# ---- data ------------------------------------------------------------------------------------------


def make_lookup(n_queries, dim, n_centers, device, dtype=torch.float32, seed=0):
    """A database of singleton clusters (MELO's usual case: the one point is the center itself) and
    queries of which half are near a stored key (hits) and half are random (misses)."""
    g = torch.Generator(device=device).manual_seed(seed)
    centers = torch.randn(n_centers, dim, generator=g, device=device, dtype=dtype)
    radii = torch.full((n_centers,), 0.5 * dim**0.5, device=device, dtype=dtype)
    offsets = torch.arange(n_centers + 1, device=device)
    blocks = torch.arange(n_centers, device=device) % 1000
    picks = torch.randint(0, n_centers, (n_queries // 2,), generator=g, device=device)
    hits = centers[picks] + 0.01 * torch.randn(len(picks), dim, generator=g, device=device, dtype=dtype)
    misses = torch.randn(n_queries - len(picks), dim, generator=g, device=device, dtype=dtype)
    queries = torch.cat([hits, misses])
    return queries, (centers, radii, offsets, centers, blocks)


def make_lora(n, t, d_in, d_out, device, dtype, rank=4, n_blocks=1000, distinct=64, grad=False, seed=0,
              edited_every=1):
    """x, A, B, block_ids, base, linear: every sample edited (or one in `edited_every`, the others
    -1), cycling through `distinct` blocks spread over the whole bank (both ends included); base is
    the output of a frozen nn.Linear on x."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=g, device=device).to(dtype)
    A = (torch.randn(n_blocks, rank, d_in, generator=g, device=device) / d_in**0.5).to(dtype)
    B = (torch.randn(n_blocks, rank, d_out, generator=g, device=device) / rank**0.5).to(dtype)
    used = torch.linspace(0, n_blocks - 1, min(distinct, n_blocks), device=device).long()
    block_ids = used[torch.arange(n, device=device) % len(used)]
    block_ids[torch.arange(n, device=device) % edited_every != 0] = -1
    linear = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        base = linear(x)
    tensors = [x, A, B, base]
    if grad:
        tensors = [v.requires_grad_() for v in tensors]
    return (*tensors[:3], block_ids, tensors[3], linear)


# ---- grids -----------------------------------------------------------------------------------------

CPU_LOOKUPS = [(64, 768, 1_000), (64, 768, 10_000), (64, 768, 100_000), (1, 768, 1_000)]
GPU_LOOKUPS = [(64, d, c) for d in (768, 4096) for c in (10_000, 100_000, 1_000_000)]
REFERENCE_MAX_PAIRS = 64 * 10_000  # query x center pairs the reference's Python loop may do per call

KINDS = ("forward", "backward", "forward+backward")
CPU_LORA = [(64, 128, 768, 3072), (8, 1, 768, 3072)]  # a training/prefill batch; a decode step
CPU_LORA_CASES = [(CPU_LORA[0], kind) for kind in KINDS] + [(CPU_LORA[1], "forward")]  # decode: inference only
GPU_LORA = [(n, t, d_in, d_out) for n, t in ((64, 128), (1, 2048), (256, 1)) for d_in, d_out in
            ((768, 3072), (4096, 4096))]
GPU_LORA_CASES = [(shape, kind) for shape in GPU_LORA for kind in KINDS]
SCALE = 4.0


def lookup_id(shape):
    return "Q{}-d{}-C{}".format(*shape)


def lora_id(shape):
    return "NxT{}x{}-{}to{}".format(*shape)


def lora_case_id(case):
    return f"{lora_id(case[0])}-{case[1]}"


def reference_rounds(backend, rounds=3):
    return rounds if backend == "reference" else None


# ---- vecdb_search ------------------------------------------------------------------------------------


def _bench_lookup(run_bench, device, backend, shape):
    n_queries, dim, n_centers = shape
    if backend == "reference" and n_queries * n_centers > REFERENCE_MAX_PAIRS:
        pytest.skip("reference backend: one call would take minutes at this size")
    queries, database = make_lookup(n_queries, dim, n_centers, device)
    seconds = run_bench(
        lambda: ops.vecdb_search(queries, *database, backend=backend),
        group=f"vecdb_search {device} Q={n_queries} d={dim} C={n_centers}",
        device=device, backend=backend, rounds=1 if backend == "reference" else None, warmup_rounds=0,
        op="vecdb_search", dtype=queries.dtype, Q=n_queries, d=dim, C=n_centers, points_per_cluster=1,
    )
    return database[0].numel() * database[0].element_size() / seconds / 1e9 if seconds else None


@pytest.mark.parametrize("shape", CPU_LOOKUPS, ids=lookup_id)
@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_vecdb_search_cpu(benchmark, run_bench, backend, shape):
    gbps = _bench_lookup(run_bench, "cpu", backend, shape)
    if gbps is not None:
        benchmark.extra_info["GB/s (centers read once)"] = round(gbps, 2)


@pytest.mark.parametrize("shape", GPU_LOOKUPS, ids=lookup_id)
@pytest.mark.parametrize("backend", [*backend_params("cuda"), pytest.param("cdist", id="cdist")])
def test_vecdb_search_cuda(benchmark, run_bench, backend, shape):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "cdist":  # the plain-torch lower bound: nearest center + radius, no point stage
        n_queries, dim, n_centers = shape
        queries, (centers, radii, _, _, blocks) = make_lookup(n_queries, dim, n_centers, "cuda")

        def cdist_lookup():
            best = torch.cdist(queries, centers).min(dim=1)
            return torch.where(best.values <= radii[best.indices], blocks[best.indices], -1)

        seconds = run_bench(cdist_lookup, group=f"vecdb_search cuda Q={n_queries} d={dim} C={n_centers}",
                            device="cuda", backend="cdist+min+radius", op="vecdb_search", dtype=queries.dtype,
                            Q=n_queries, d=dim, C=n_centers)
        gbps = centers.numel() * centers.element_size() / seconds / 1e9 if seconds else None
    else:
        gbps = _bench_lookup(run_bench, "cuda", backend, shape)
    if gbps is not None:
        benchmark.extra_info["GB/s (centers read once)"] = round(gbps, 2)


# ---- block_lora ----------------------------------------------------------------------------------------


def _lora_group(kind, device, shape, dtype):
    n, t, d_in, d_out = shape
    return f"block_lora {kind} {device} NxT={n}x{t} {d_in}->{d_out} k=4 {str(dtype).split('.')[-1]}"


def _lora_info(shape, dtype, block_ids):
    n, t, d_in, d_out = shape
    return dict(op="block_lora", dtype=dtype, N=n, T=t, d_in=d_in, d_out=d_out, k=4, n_blocks=1000,
                distinct_blocks=int(block_ids[block_ids >= 0].unique().numel()),
                edited_samples=int((block_ids >= 0).sum()))


def _bench_lora(run_bench, device, backend, shape, kind, dtype):
    n, t, d_in, d_out = shape
    grad = kind != "forward"
    x, A, B, block_ids, base, _ = make_lora(n, t, d_in, d_out, device, dtype, grad=grad)
    info = _lora_info(shape, dtype, block_ids)
    group = _lora_group(kind, device, shape, dtype)
    rounds = reference_rounds(backend)

    def forward():
        return ops.block_lora(x, A, B, block_ids, SCALE, base, backend=backend)

    if kind == "forward":
        with torch.no_grad():
            run_bench(forward, group=group, device=device, backend=backend, rounds=rounds, **info)
        return
    grad_out = torch.randn_like(base)

    def clear():
        for v in (x, A, B, base):
            v.grad = None

    if kind == "backward":  # a fresh graph per round, built outside the timed region

        def setup():
            clear()
            return (forward(),)

        run_bench(lambda out: out.backward(grad_out), group=group, device=device, backend=backend,
                  rounds=rounds or 10, setup=setup, **info)
    else:

        def step():
            clear()
            forward().backward(grad_out)

        run_bench(step, group=group, device=device, backend=backend, rounds=rounds, **info)


@pytest.mark.parametrize("case", CPU_LORA_CASES, ids=lora_case_id)
@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_block_lora_cpu(run_bench, backend, case):
    _bench_lora(run_bench, "cpu", backend, *case, torch.float32)


@pytest.mark.parametrize("case", GPU_LORA_CASES, ids=lora_case_id)
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_block_lora_cuda(run_bench, backend, case):
    _bench_lora(run_bench, "cuda", backend, *case, torch.bfloat16)


def _bench_linear(run_bench, device, shape, dtype):
    """The frozen layer alone (nn.Linear on the same input): what the LoRA add-on is measured against."""
    x, _, _, block_ids, _, linear = make_lora(*shape, device, dtype)
    with torch.no_grad():
        run_bench(lambda: linear(x), group=_lora_group("forward", device, shape, dtype), device=device,
                  backend="nn.Linear (base only)", **_lora_info(shape, dtype, block_ids))


@pytest.mark.parametrize("shape", CPU_LORA, ids=lora_id)
def test_linear_baseline_cpu(run_bench, shape):
    _bench_linear(run_bench, "cpu", shape, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", GPU_LORA, ids=lora_id)
def test_linear_baseline_cuda(run_bench, shape):
    _bench_linear(run_bench, "cuda", shape, torch.bfloat16)


# ---- block_lora in place (the inference path of the patched layers) ------------------------------------

CPU_ROUNDS = {CPU_LORA[0]: 12, CPU_LORA[1]: 300}  # pedantic rounds: ~0.5 s vs ~0.5 ms per nn.Linear call


@pytest.mark.parametrize("shape", CPU_LORA, ids=lora_id)
@pytest.mark.parametrize("backend", [p for p in backend_params("cpu") if p.id != "reference"])
def test_block_lora_inplace_cpu(run_bench, backend, shape):
    """The op alone with ``inplace=True``: each round writes into a fresh copy of base, made untimed."""
    x, A, B, block_ids, base, _ = make_lora(*shape, "cpu", torch.float32)

    def setup():
        return (base.clone(),)

    def forward(target):
        with torch.no_grad():
            return ops.block_lora(x, A, B, block_ids, SCALE, target, backend=backend, inplace=True)

    run_bench(forward, group=_lora_group("forward", "cpu", shape, torch.float32), device="cpu",
              backend=f"{backend} (inplace)", rounds=CPU_ROUNDS[shape], setup=setup,
              **_lora_info(shape, torch.float32, block_ids))


LAYER_CASES = [(CPU_LORA[0], 1), (CPU_LORA[0], 4), (CPU_LORA[1], 1)]  # (shape, one sample in N edited)


@pytest.mark.parametrize("variant", ["linear", "out-of-place", "inplace"])
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{lora_id(c[0])}-edited1in{c[1]}")
def test_layer_inference_cpu(benchmark, run_bench, case, variant):
    """nn.Linear then the cpp add-on, as BlockLoRAHook.hook runs it under no_grad, vs nn.Linear alone.

    Every round of an add-on variant is preceded (untimed by pytest-benchmark) by a timed call of
    nn.Linear alone, so the two alternate and machine-load drift cannot bias their ratio."""
    if ops.backend_status()["cpp"] != "available":
        pytest.skip(f"cpp: {ops.backend_status()['cpp']}")
    shape, edited_every = case
    x, A, B, block_ids, _, linear = make_lora(*shape, "cpu", torch.float32, edited_every=edited_every)
    group = f"block_lora layer inference cpu NxT={shape[0]}x{shape[1]} {shape[2]}->{shape[3]} k=4 float32 " \
            f"edited=1/{edited_every}"
    info = _lora_info(shape, torch.float32, block_ids)
    rounds = CPU_ROUNDS[shape]

    def layer(inplace):
        def run():
            with torch.no_grad():
                base = linear(x)
                return ops.block_lora(x, A, B, block_ids, SCALE, base, backend="cpp", inplace=inplace)

        return run

    def linear_alone():
        with torch.no_grad():
            return linear(x)

    if variant == "linear":
        run_bench(linear_alone, group=group, device="cpu", backend="nn.Linear (base only)", rounds=rounds, **info)
        return
    paired = []
    timer = getattr(benchmark, "_timer", None) or time.perf_counter  # the timer of the timed rounds

    def setup():
        start = timer()
        linear_alone()
        paired.append(timer() - start)
        return ()

    run_bench(layer(variant == "inplace"), group=group, device="cpu", backend=f"nn.Linear + cpp add-on ({variant})",
              rounds=rounds, setup=setup, case=f"nn.Linear + cpp add-on ({variant})", **info)
    times = benchmark.stats.stats.data
    paired = paired[len(paired) - len(times):]  # drop the warm-up round's
    ratios = sorted((t - p) / p for t, p in zip(times, paired, strict=True))
    ordered = sorted(paired)
    benchmark.extra_info["paired"] = {"case": "nn.Linear (base only)", "min": ordered[0],
                                      "median": ordered[len(ordered) // 2], "rounds": len(ordered),
                                      "times": paired}  # round order, as stats.data: per-round ratios
    benchmark.extra_info["add-on / Linear"] = round(ratios[len(ratios) // 2], 4)
    benchmark.extra_info["add-on / Linear (min - min)"] = round((min(times) - ordered[0]) / ordered[0], 4)
