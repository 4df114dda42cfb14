"""Layer benchmark: one patched target layer vs plain ``nn.Linear`` vs PEFT LoRA with per-sample adapters.

    pytest -q benchmarks/test_bench_layer.py --benchmark-only

Shape: B x T = 64 x 128 tokens, 768 -> 3072, rank k = 4 per block (per adapter), fp32, inference
(no grad). melo_fast: the real ``BlockLoRAHook`` forward hook on an ``nn.Linear``, a bank of 64
blocks, the routing set to 1 distinct block for the whole batch or 64 distinct blocks (one per
sample). PEFT: a ``peft`` LoRA ``Linear`` with 64 adapters of rank 4; the single-adapter case is
PEFT's ordinary forward with one active adapter, the per-sample case passes ``adapter_names=``
(PEFT's mixed-batch forward, a Python loop over the distinct adapters of the batch).
Every round starts from a trimmed C heap (``release_free_memory``, untimed): the outputs here are
96 MiB, and glibc serves such an allocation from free heap memory when an earlier case left some,
from fresh pages (a page fault per 4 KiB) otherwise, so without the trim a case's time depended on
which cases ran before it (in one run ``cpp`` took no page fault and measured faster than
``nn.Linear`` alone). Every case also records its minor page faults per call: PEFT's one-adapter
forward adds ``result + lora_B(lora_A(x)) * scaling`` out of place, three more tensors of the
output's size, fresh memory on every call; the per-sample path's temporaries are one sample's size.
Groups: "layer ... 1 distinct" (baseline: PEFT single adapter) and "layer ... 64 distinct"
(baseline: PEFT per-sample adapters).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from melo_fast.routing import BlockLoRAHook, EditState, Routing
from melo_fast.vecdb import VectorDatabase

try:
    from benchmarks._common import DEVICE, backend_params, bench, default_backend, release_free_memory
except ImportError:  # benchmarks/ run as a rootdir-less folder
    from _common import DEVICE, backend_params, bench, default_backend, release_free_memory

N, T, D_IN, D_OUT, RANK, BANK = 64, 128, 768, 3072, 4, 64
DTYPE = torch.float32
SCALE = 20.0
PEFT_SINGLE = "PEFT LoRA, 1 active adapter"
PEFT_MIXED = "PEFT LoRA, adapter_names= per sample"


def group(distinct: int) -> str:
    return f"layer {DEVICE} BxT={N}x{T} {D_IN}->{D_OUT} k={RANK} fp32: {distinct} distinct block(s) in the batch"


def info(distinct: int, **extra) -> dict:
    return dict(op="layer", dtype=DTYPE, N=N, T=T, d_in=D_IN, d_out=D_OUT, k=RANK, bank_blocks=BANK,
                distinct=distinct, shapes={"x": [N, T, D_IN], "W": [D_OUT, D_IN], "A": [BANK, RANK, D_IN],
                                           "B": [BANK, RANK, D_OUT]}, **extra)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, T, D_IN, generator=g).to(DEVICE, DTYPE)
    linear = nn.Linear(D_IN, D_OUT).to(DEVICE, DTYPE).requires_grad_(False)
    return x, linear


def block_ids(distinct: int) -> torch.Tensor:
    return (torch.arange(N) % distinct).to(DEVICE)


@pytest.mark.parametrize("distinct", [1, 64])
def test_linear(benchmark, data, distinct):
    x, linear = data
    baseline = PEFT_SINGLE if distinct == 1 else PEFT_MIXED
    with torch.no_grad():
        bench(benchmark, lambda: linear(x), group=group(distinct), case="nn.Linear (no LoRA)", baseline=baseline,
              setup=release_free_memory, count_faults=True, **info(distinct, backend="none"))


@pytest.mark.parametrize("distinct", [1, 64])
@pytest.mark.parametrize("backend", backend_params())
def test_melo_layer(benchmark, data, backend, distinct):
    x, linear = data
    module = nn.Linear(D_IN, D_OUT).to(DEVICE, DTYPE).requires_grad_(False)
    module.load_state_dict(linear.state_dict())
    empty_database = VectorDatabase(D_IN, 1.0, device=DEVICE)  # unused: the router's decision is set below
    routing = Routing(EditState(empty_database, {"fc": ()}, 0))
    lora = BlockLoRAHook("fc", module, routing, RANK, SCALE, backend)
    g = torch.Generator().manual_seed(1)
    lora.bank.extend((torch.randn(BANK, RANK, D_IN, generator=g) / D_IN**0.5).to(DEVICE),
                     (torch.randn(BANK, RANK, D_OUT, generator=g) * 0.01).to(DEVICE))
    handle = module.register_forward_hook(lora.hook)
    # What the router would have decided for this batch, in the state it would have read.
    routing.call.edit_state = EditState(empty_database, {"fc": lora.bank.chunks()}, BANK)
    routing.call.block_ids = block_ids(distinct)
    baseline = PEFT_SINGLE if distinct == 1 else PEFT_MIXED
    slow = backend == "reference"
    try:
        with torch.no_grad():
            bench(benchmark, lambda: module(x), group=group(distinct), case=f"melo_fast BlockLoRA [{backend}]",
                  baseline=baseline, min_rounds=2 if slow else 3, warmup=0 if slow else 1,
                  setup=release_free_memory, count_faults=True,
                  **info(distinct, backend=backend, default_backend=backend == default_backend()))
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def peft_layer(data):
    peft = pytest.importorskip("peft", reason="PEFT is a benchmark-only extra: pip install -e '.[bench]'")
    _, linear = data

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D_IN, D_OUT).to(DEVICE, DTYPE)
            self.fc.load_state_dict(linear.state_dict())

        def forward(self, x):
            return self.fc(x)

    model = One()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multiple adapters in the model": that is the point here
        for i in range(BANK):
            config = peft.LoraConfig(r=RANK, lora_alpha=RANK * SCALE, lora_dropout=0.0, target_modules=["fc"],
                                     init_lora_weights=False)  # non-zero B, like a trained adapter
            peft.inject_adapter_in_model(config, model, adapter_name=f"a{i}")
    model.eval().requires_grad_(False)
    return model.fc


@pytest.mark.parametrize("distinct", [1, 64], ids=["1", "64"])
@pytest.mark.parametrize("mode", ["single", "per-sample"])
def test_peft_layer(benchmark, data, peft_layer, mode, distinct):
    import peft

    x, _ = data
    if mode == "single":
        if distinct != 1:
            pytest.skip("one active adapter serves one adapter per batch")
        peft_layer.set_adapter("a0")

        def forward():
            return peft_layer(x)

        case = PEFT_SINGLE
    else:
        names = [f"a{i}" for i in block_ids(distinct).tolist()]

        def forward():
            return peft_layer(x, adapter_names=names)

        case = PEFT_MIXED
    with torch.no_grad():
        bench(benchmark, forward, group=group(distinct), case=case,
              baseline=PEFT_SINGLE if distinct == 1 else PEFT_MIXED,
              setup=release_free_memory, count_faults=True,
              **info(distinct, backend="peft", peft_mode=mode, peft=peft.__version__, adapters=BANK))
