"""Parity of the Triton backend's block_lora with the reference op: forward, gradients, in place, fp64,
aliasing.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); every program instance then costs milliseconds, so the CPU shapes stay
small (a few dozen programs per launch) while still crossing tile boundaries. Helpers: tests/ops_triton_helpers.py.
"""

from __future__ import annotations

import pytest
import torch

import tests.ops_triton_helpers  # noqa: F401  (skips this module without a usable Triton)
from melo_fast import ops  # noqa: E402
from melo_fast.ops.triton.block_lora import block_lora_fwd  # noqa: E402
from tests.ops_triton_helpers import (  # noqa: E402
    DEVICE,
    LORA_CASES,
    LORA_IDS,
    _run_python,
    lora_with_grads,
    make_lora,
    rel_close,
)


@pytest.mark.parametrize("n,t,d_in,d_out,n_blocks,k,ids", LORA_CASES, ids=LORA_IDS)
@pytest.mark.parametrize("use_base", [True, False], ids=["base", "no-base"])
def test_block_lora_fp32_matches_reference(n, t, d_in, d_out, n_blocks, k, ids, use_base):
    x, A, B, base, block_ids = make_lora(n, t, d_in, d_out, n_blocks, k, ids)
    grad_out = torch.randn(n, t, d_out, device=DEVICE)
    scale = 2.5
    out, grads = lora_with_grads("triton", x, A, B, base, block_ids, scale, grad_out, use_base)
    ref_out, ref_grads = lora_with_grads("reference", x, A, B, base, block_ids, scale, grad_out, use_base)
    assert out.dtype == torch.float32
    # fp32: both sides round differently (sum order); 1e-5 of the largest magnitude covers it.
    rel_close(out, ref_out, 1e-5)
    names = ["x", "A", "B"] + (["base"] if use_base else [])
    for name, g, g_ref in zip(names, grads[: len(names)], ref_grads[: len(names)], strict=True):
        rel_close(g, g_ref, 1e-5, what=f"grad {name}")

    unedited = block_ids < 0
    used = torch.zeros(n_blocks, dtype=torch.bool, device=DEVICE)
    used[block_ids[~unedited]] = True
    expected_rows = base[unedited] if use_base else torch.zeros_like(out[unedited])
    assert torch.equal(out[unedited], expected_rows), "unedited samples must get base bit for bit"
    assert torch.equal(grads[0][unedited], torch.zeros_like(grads[0][unedited]))
    assert torch.equal(grads[1][~used], torch.zeros_like(grads[1][~used])), "unused blocks: zero grad A"
    assert torch.equal(grads[2][~used], torch.zeros_like(grads[2][~used])), "unused blocks: zero grad B"
    if use_base:
        assert torch.equal(grads[3], grad_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [LORA_CASES[1], LORA_CASES[3]], ids=[LORA_IDS[1], LORA_IDS[3]])
def test_block_lora_half_vs_fp32_reference(case, dtype):
    n, t, d_in, d_out, n_blocks, k, ids = case
    x, A, B, base, block_ids = make_lora(n, t, d_in, d_out, n_blocks, k, ids, dtype=dtype)
    grad_out = torch.randn(n, t, d_out, device=DEVICE).to(dtype)
    out, grads = lora_with_grads("triton", x, A, B, base, block_ids, 2.0, grad_out)
    ref_out, ref_grads = lora_with_grads(
        "reference", x.float(), A.float(), B.float(), base.float(), block_ids, 2.0, grad_out.float()
    )
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    rel_close(out, ref_out, 2e-2)
    for name, g, g_ref in zip(["x", "A", "B", "base"], grads, ref_grads, strict=True):
        rel_close(g, g_ref, 2e-2, what=f"grad {name}")
    unedited = block_ids < 0
    assert torch.equal(out[unedited], base[unedited])


def test_block_lora_base_of_another_dtype_is_refused():
    """The dispatcher requires base in x's dtype (the patched layers always pass it so)."""
    x, A, B, base, block_ids = make_lora(3, 4, 16, 24, 2, 2, [1, -1, 0], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="base must be torch.bfloat16"):
        ops.block_lora(x, A, B, block_ids, 2.0, base.float(), backend="triton")


def test_block_lora_all_unedited_is_base_bitwise():
    x, A, B, base, block_ids = make_lora(3, 5, 16, 24, 2, 2, [-1, -1, -1], dtype=torch.bfloat16)
    out, grads = lora_with_grads("triton", x, A, B, base, block_ids, 3.0, torch.ones_like(base))
    assert torch.equal(out, base)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[:3])


def test_block_lora_backward_is_deterministic():
    x, A, B, base, block_ids = make_lora(6, 20, 24, 40, 3, 4, [1, 1, 1, 0, 1, -1])
    grad_out = torch.randn(6, 20, 40, device=DEVICE)
    first = lora_with_grads("triton", x, A, B, base, block_ids, 1.5, grad_out)[1]
    second = lora_with_grads("triton", x, A, B, base, block_ids, 1.5, grad_out)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# Which of (x, A, B, base) require grad: frozen B (training A only, or upstream x), frozen A, etc.
FROZEN_CASES = [("x", "A"), ("A",), ("x",), ("B",), ("A", "B"), ("x", "B", "base")]


@pytest.mark.parametrize("trainable", FROZEN_CASES, ids=["+".join(c) for c in FROZEN_CASES])
def test_block_lora_partial_grads_match_reference(trainable):
    """Backward with some inputs frozen (e.g. B: the forward then keeps no h) against the reference."""
    x, A, B, base, block_ids = make_lora(4, 9, 40, 24, 3, 2, [2, -1, 0, 2])
    grad_out = torch.randn(4, 9, 24, device=DEVICE)
    names = ("x", "A", "B", "base")
    results = {}
    for backend in ("triton", "reference"):
        leaves = {
            n: v.detach().clone().requires_grad_(n in trainable) for n, v in zip(names, (x, A, B, base), strict=True)
        }
        out = ops.block_lora(leaves["x"], leaves["A"], leaves["B"], block_ids, 1.5, leaves["base"], backend=backend)
        out.backward(grad_out)
        results[backend] = (out.detach(), {n: leaves[n].grad for n in names})
    rel_close(results["triton"][0], results["reference"][0], 1e-5)
    for name in names:
        grad, grad_ref = results["triton"][1][name], results["reference"][1][name]
        if name not in trainable:
            assert grad is None, f"{name} is frozen but got a gradient"
            continue
        rel_close(grad, grad_ref, 1e-5, what=f"grad {name}")
        assert grad.abs().max() > 0, f"grad {name} should not be all zeros here"


def test_block_lora_frozen_b_keeps_no_h():
    x, A, B, base, block_ids = make_lora(2, 3, 16, 16, 2, 1, [1, 0])
    assert block_lora_fwd(x, A, B, block_ids, 1.0, base)[1] is None
    assert block_lora_fwd(x, A, B, block_ids, 1.0, base, store_h=True)[1].shape == (2, 3, 16)


def test_block_lora_noncontiguous_inputs():
    x, A, B, base, block_ids = make_lora(3, 4, 16, 20, 2, 2, [1, -1, 0])
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    base_t = base.transpose(0, 1).contiguous().transpose(0, 1)
    out = ops.block_lora(x_t, A, B, block_ids, 2.0, base_t, backend="triton")
    ref = ops.block_lora(x, A, B, block_ids, 2.0, base, backend="reference")
    rel_close(out, ref, 1e-5)
    assert torch.equal(out[1], base[1])


def _bits(t):
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [LORA_CASES[1], LORA_CASES[3]], ids=[LORA_IDS[1], LORA_IDS[3]])
def test_block_lora_inplace_equals_out_of_place(case, dtype):
    """Same kernel, out pointer = base: bitwise the out-of-place values; block -1 tiles untouched."""
    n, t, d_in, d_out, n_blocks, k, ids = case
    x, A, B, base, block_ids = make_lora(n, t, d_in, d_out, n_blocks, k, ids, dtype=dtype)
    base[block_ids < 0] = float("nan")  # a program that wrote an unedited tile would change the bits
    expected = ops.block_lora(x, A, B, block_ids, 2.5, base, backend="triton")
    target = base.clone()
    version = target._version
    out = ops.block_lora(x, A, B, block_ids, 2.5, target, backend="triton", inplace=True)
    assert out is target and out.dtype == dtype
    assert torch.equal(_bits(out), _bits(expected))
    unedited = block_ids < 0
    assert torch.equal(_bits(target[unedited]), _bits(base[unedited]))
    assert target._version > version


def test_block_lora_inplace_noncontiguous_base_and_grad_errors():
    x, A, B, base, block_ids = make_lora(3, 4, 16, 20, 2, 2, [1, -1, 0])
    expected = ops.block_lora(x, A, B, block_ids, 2.0, base, backend="triton")
    target = base.transpose(0, 1).contiguous().transpose(0, 1)  # the kernel cannot write it: copy path
    out = ops.block_lora(x, A, B, block_ids, 2.0, target, backend="triton", inplace=True)
    assert out is target and torch.equal(target, expected)
    for name in ("x", "A", "B", "base"):
        tensors = {"x": x, "A": A, "B": B, "base": base.clone()}
        tensors[name] = tensors[name].clone().requires_grad_()
        with pytest.raises(ValueError, match=f"but {name} requires grad"):
            ops.block_lora(tensors["x"], tensors["A"], tensors["B"], block_ids, 2.0, tensors["base"],
                           backend="triton", inplace=True)  # fmt: skip
    with torch.no_grad():
        target = base.clone().requires_grad_()
        ops.block_lora(x, A, B, block_ids, 2.0, target, backend="triton", inplace=True)
    assert torch.equal(target.detach(), expected)
    with pytest.raises(ValueError, match="contiguous base"):
        block_lora_fwd(x, A, B, block_ids, 2.0, base.transpose(0, 1).contiguous().transpose(0, 1), inplace=True)


def test_block_lora_fp64_uses_torch_backend_at_full_precision(caplog):
    """tl.dot accumulates in fp32: fp64 must not silently come back at fp32 accuracy."""
    x, A, B, base, block_ids = make_lora(3, 7, 33, 17, 4, 2, [0, -1, 3], dtype=torch.float64)
    grad_out = torch.randn(3, 7, 17, device=DEVICE, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="melo_fast.ops.triton"):
        out, grads = lora_with_grads("triton", x, A, B, base, block_ids, 2.5, grad_out)
        lora_with_grads("triton", x, A, B, base, block_ids, 2.5, grad_out)
    ref_out, ref_grads = lora_with_grads("reference", x, A, B, base, block_ids, 2.5, grad_out)
    assert out.dtype == torch.float64
    rel_close(out, ref_out, 1e-12)
    for name, g, g_ref in zip(["x", "A", "B", "base"], grads, ref_grads, strict=True):
        rel_close(g, g_ref, 1e-12, what=f"grad {name}")
    target = base.clone()
    assert ops.block_lora(x, A, B, block_ids, 2.5, target, backend="triton", inplace=True) is target
    rel_close(target, ref_out, 1e-12)
    lines = [r.getMessage() for r in caplog.records if "float64" in r.getMessage() and "block_lora" in r.getMessage()]
    assert len(lines) <= 1, "one log line per process, not one per call"  # 0 if an earlier test logged it


def test_fp64_routing_logs_one_line():
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING, format='LOG %(message)s')\n"
        "from melo_fast import ops\n"
        "x = torch.randn(2, 3, 16, dtype=torch.float64); A = torch.randn(2, 1, 16, dtype=torch.float64)\n"
        "B = torch.randn(2, 1, 16, dtype=torch.float64); ids = torch.tensor([1, -1])\n"
        "for _ in range(3):\n    ops.block_lora(x, A, B, ids, 2.0, x.clone(), backend='triton')\n"
        "q = torch.randn(3, 16, dtype=torch.float64)\n"
        "for _ in range(3):\n"
        "    ops.vecdb_search(q, q, torch.ones(3), torch.arange(4), q, torch.arange(3), backend='triton')\n"
    )
    done = _run_python(code, TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("LOG")]
    assert len(lines) == 2 and "block_lora" in lines[0] and "vecdb_search" in lines[1], lines
    assert all("float64" in line and "torch backend" in line for line in lines)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize("alias", ["x", "A", "B"])
def test_block_lora_inplace_refuses_base_sharing_memory_with_inputs(alias, backend):
    """In place, a base overlapping an input is a race on a GPU (and silently sequential on a CPU)."""
    x, A, B, base, block_ids = make_lora(2, 4, 16, 16, 2, 1, [1, 0])
    rows = base.numel()
    if alias == "x":
        base = x  # the layer's output written over its own input
    elif alias == "A":  # the last 16 floats of A are the first 16 of base
        storage = torch.randn(A.numel() + rows, device=DEVICE)
        A, base = storage[: A.numel()].view_as(A), storage[A.numel() - 16 : A.numel() - 16 + rows].view_as(base)
    else:  # B starts on the last float of base
        storage = torch.randn(rows + B.numel(), device=DEVICE)
        base, B = storage[:rows].view_as(base), storage[rows - 1 : rows - 1 + B.numel()].view_as(B)
    before = base.clone()
    with pytest.raises(ValueError, match=f"base shares memory with {alias}"):
        ops.block_lora(x, A, B, block_ids, 2.0, base, backend=backend, inplace=True)
    assert torch.equal(base, before), "a refused call must not write anything"


def test_block_lora_inplace_accepts_adjacent_memory():
    x, A, B, _, block_ids = make_lora(2, 4, 16, 16, 2, 1, [1, 0])
    storage = torch.randn(2 * 4 * 16 + B.numel(), device=DEVICE)
    base, B = storage[: 2 * 4 * 16].view(2, 4, 16), storage[2 * 4 * 16 :].view_as(B)
    expected = ops.block_lora(x, A, B, block_ids, 2.0, base, backend="reference")
    rel_close(ops.block_lora(x, A, B, block_ids, 2.0, base, backend="triton", inplace=True), expected, 1e-5)
