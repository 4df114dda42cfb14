"""The Triton backend on a GPU: compiled kernels, larger shapes, tensors on another device, host
synchronization. Every test here skips without CUDA. Helpers: tests/ops_triton_helpers.py.
"""

from __future__ import annotations

import pytest
import torch

import tests.ops_triton_helpers  # noqa: F401  (skips this module without a usable Triton)
from melo_fast import ops  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from tests.ops_triton_helpers import (  # noqa: E402
    assert_same_ids,
    lora_with_grads,
    make_db,
    make_lora,
    make_queries,
    rel_close,
    search,
)

GPU_SEARCH = [(1, 1_000_000, 64), (64, 100_000, 1024), (300, 10_000, 8192)]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n_queries,n_centers,dim", GPU_SEARCH, ids=[f"Q{q}-C{c}-d{d}" for q, c, d in GPU_SEARCH])
def test_gpu_search_large(n_queries, n_centers, dim, dtype):
    db = make_db(n_centers, dim, radius=0.1 * dim**0.5 + 0.5, dtype=dtype, device="cuda")
    queries = make_queries(db[0], n_queries)
    expected = search("torch", queries, db)  # the vectorized backend mirrors the reference exactly
    actual = search("triton", queries, db)
    assert torch.equal(actual, expected)
    if n_queries > 1:
        assert (expected >= 0).any() and (expected == -1).any()


@requires_cuda
@pytest.mark.gpu
def test_gpu_search_matches_reference_small():
    db = make_db(200, 128, radius=0.1 * 128**0.5 + 0.5, device="cuda")
    queries = make_queries(db[0], 40)
    assert_same_ids(queries, db)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_block_lora_large(dtype):
    ids = [0, 15, -1, 3, 3, -1, 15, 7]
    x, A, B, base, block_ids = make_lora(8, 129, 1024, 2048, 16, 4, ids, dtype=dtype, device="cuda")
    grad_out = torch.randn_like(base)
    out, grads = lora_with_grads("triton", x, A, B, base, block_ids, 2.0, grad_out)
    ref_out, ref_grads = lora_with_grads(
        "torch", x.double(), A.double(), B.double(), base.double(), block_ids, 2.0, grad_out.double()
    )
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    rel_close(out, ref_out, rtol)
    for name, g, g_ref in zip(["x", "A", "B", "base"], grads, ref_grads, strict=True):
        rel_close(g, g_ref, rtol, what=f"grad {name}")
    unedited = block_ids < 0
    assert torch.equal(out[unedited], base[unedited])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.gpu
def test_gpu_tensors_on_another_device_than_the_current_one():
    """A model on cuda:1 (or split by device_map) while cuda:0 is current: kernels must follow the tensors."""
    db = make_db(300, 64, radius=0.1 * 64**0.5 + 0.5, device="cuda:1")
    queries = make_queries(db[0], 20)
    x, A, B, base, block_ids = make_lora(4, 33, 64, 96, 3, 2, [2, -1, 0, 2], device="cuda:1")
    grad_out = torch.randn_like(base)
    with torch.cuda.device(0):
        ids = search("triton", queries, db)
        out, grads = lora_with_grads("triton", x, A, B, base, block_ids, 2.0, grad_out)
        torch.cuda.synchronize(1)
    assert ids.device == torch.device("cuda:1") and torch.equal(ids, search("torch", queries, db))
    ref_out, ref_grads = lora_with_grads("torch", x, A, B, base, block_ids, 2.0, grad_out)
    rel_close(out, ref_out, 1e-5)
    for name, g, g_ref in zip(["x", "A", "B", "base"], grads, ref_grads, strict=True):
        rel_close(g, g_ref, 1e-5, what=f"grad {name}")


@requires_cuda
@pytest.mark.gpu
def test_gpu_no_host_sync():
    db = make_db(5000, 256, radius=3.0, device="cuda")
    queries = make_queries(db[0], 16)
    x, A, B, base, block_ids = make_lora(4, 32, 256, 512, 8, 4, [0, -1, 7, 7], device="cuda")
    for tensor in (x, A, B, base):
        tensor.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = search("triton", queries, db)
        out = ops.block_lora(x, A, B, block_ids, 2.0, base, backend="triton")
        out.backward(torch.ones_like(out))
        with torch.no_grad():  # the inference path of the patched layers
            target = base.detach().clone()
            ops.block_lora(x, A, B, block_ids, 2.0, target, backend="triton", inplace=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.shape == (16,) and x.grad is not None and A.grad is not None
    assert torch.equal(target, out.detach())
