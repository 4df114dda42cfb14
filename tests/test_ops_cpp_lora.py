"""The C++ CPU backend's (``cpp``, csrc/) block_lora against the ``reference`` backend: forward and every
gradient, and in place (inference).

The tests skip when ``melo_fast._C`` was not built (tests/ops_cpp_helpers.py).
"""

import pytest
import torch

from melo_fast import ops
from tests.ops_cpp_helpers import DTYPE_ID, LOW, needs_ext

# ---- block_lora -----------------------------------------------------------------------------------


def lora_inputs(n, t, d_in, d_out, rank, n_blocks, block_ids, dtype=torch.float32, with_base=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d_in, generator=g)
    A = torch.randn(n_blocks, rank, d_in, generator=g) / d_in**0.5  # unit-scale hidden
    B = torch.randn(n_blocks, rank, d_out, generator=g) / rank**0.5  # unit-scale output
    base = torch.randn(n, t, d_out, generator=g) if with_base else None
    cast = [v.to(dtype).requires_grad_() if v is not None else None for v in (x, A, B, base)]
    return (*cast, torch.tensor(block_ids, dtype=torch.int64))


def run_lora(backend, x, A, B, block_ids, scale, base, grad_seed=5):
    """Output and every gradient (x, A, B, base) of block_lora for one backend, on fresh leaves.

    A leaf that does not reach the output (all samples -1 in the reference) gets a zero gradient."""
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in (x, A, B, base)]
    out = ops.block_lora(leaves[0], leaves[1], leaves[2], block_ids, scale, leaves[3], backend=backend)
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=g).to(out.dtype)
    out.backward(grad_out)
    grads = [None if v is None else v.grad if v.grad is not None else torch.zeros_like(v) for v in leaves]
    return out.detach(), grads


def assert_close_fp32(got, expected, name):
    """atol 1e-5 for unit-scale values; gradients of the bank sum over every token of a block and grow
    with N*T, so the tolerance scales with the tensor's magnitude above 1 (fp32 epsilon is relative)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# (N, T, d_in, d_out, block_ids, n_blocks): odd sizes, blocks at both ends of the bank, -1 samples.
LORA_CASES = {
    "N1-T1-d1": (1, 1, 1, 1, [0], 1),
    "N7-T3-d33x17": (7, 3, 33, 17, [0, -1, 8, 3, 3, -1, 0], 9),
    "N4-T33-d7x123": (4, 33, 7, 123, [4, 0, -1, 4], 5),
    "N5-T7-d123x33": (5, 7, 123, 33, [-1, 2, 0, 2, -1], 3),
    "N3-T18-d40x24": (3, 18, 40, 24, [-1, -1, -1], 4),  # nobody edited
}


@needs_ext
@pytest.mark.parametrize("rank", range(1, 9), ids=lambda k: f"k{k}")
@pytest.mark.parametrize("case", LORA_CASES.values(), ids=LORA_CASES.keys())
def test_block_lora_fp32_matches_reference_with_every_gradient(case, rank):
    n, t, d_in, d_out, ids, n_blocks = case
    x, A, B, base, block_ids = lora_inputs(n, t, d_in, d_out, rank, n_blocks, ids)
    out_ref, grads_ref = run_lora("reference", x, A, B, block_ids, 1.75, base)
    out, grads = run_lora("cpp", x, A, B, block_ids, 1.75, base)
    assert out.dtype == torch.float32
    assert_close_fp32(out, out_ref, "out")
    for name, got, expected in zip(("grad_x", "grad_A", "grad_B", "grad_base"), grads, grads_ref, strict=True):
        assert_close_fp32(got, expected, name)
    absent = [b for b in range(n_blocks) if b not in ids]
    assert (grads[1][absent] == 0).all() and (grads[2][absent] == 0).all(), "grads of absent blocks must be 0"
    none = block_ids == -1
    assert torch.equal(out[none], base.detach()[none]), "block -1 must get base bit for bit"
    assert (grads[0][none] == 0).all()


@needs_ext
@pytest.mark.parametrize("dtype", LOW, ids=lambda t: DTYPE_ID[t])
@pytest.mark.parametrize("rank", [1, 4, 8], ids=lambda k: f"k{k}")
def test_block_lora_16bit_close_to_fp32_reference(dtype, rank):
    x, A, B, base, block_ids = lora_inputs(6, 9, 123, 65, rank, 5, [4, -1, 0, 2, 4, -1], dtype=dtype)
    fp32 = [v.float() for v in (x, A, B, base)]
    out_ref, grads_ref = run_lora("reference", *fp32[:3], block_ids, 2.0, fp32[3])
    out, grads = run_lora("cpp", x, A, B, block_ids, 2.0, base)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for name, got, expected in zip(("out", "grad_x", "grad_A", "grad_B", "grad_base"), [out, *grads],
                                   [out_ref, *grads_ref], strict=True):
        rel = (got.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)
        assert rel < 1e-2, f"{name}: relative error {rel:.2e}"
    none = block_ids == -1
    assert torch.equal(out[none], base.detach()[none])
    assert (grads[1][[1, 3]] == 0).all() and (grads[2][[1, 3]] == 0).all()


@needs_ext
def test_block_lora_without_base():
    x, A, B, _, block_ids = lora_inputs(3, 4, 10, 12, 2, 3, [2, -1, 0], with_base=False)
    out_ref, grads_ref = run_lora("reference", x, A, B, block_ids, 0.5, None)
    out, grads = run_lora("cpp", x, A, B, block_ids, 0.5, None)
    assert_close_fp32(out, out_ref, "out")
    assert (out[1] == 0).all()
    for name, got, expected in zip(("grad_x", "grad_A", "grad_B"), grads[:3], grads_ref[:3], strict=True):
        assert_close_fp32(got, expected, name)


@needs_ext
def test_block_lora_rank_zero_bank():
    x, A, B, base, block_ids = lora_inputs(3, 2, 6, 5, 0, 2, [1, -1, 0])
    out_ref, grads_ref = run_lora("reference", x, A, B, block_ids, 2.0, base)
    out, grads = run_lora("cpp", x, A, B, block_ids, 2.0, base)
    assert torch.equal(out, out_ref)
    for got, expected in zip(grads, grads_ref, strict=True):
        assert torch.equal(got, expected)


@needs_ext
def test_block_lora_block_minus_one_is_base_even_with_nan_input():
    x, A, B, base, block_ids = lora_inputs(2, 3, 8, 8, 2, 2, [-1, 1])
    with torch.no_grad():
        x[0] = float("nan")
        A[0] = float("inf")
    out = ops.block_lora(x.detach(), A.detach(), B.detach(), block_ids, 3.0, base.detach(), backend="cpp")
    assert torch.equal(out[0], base.detach()[0])
    assert torch.isfinite(out[1]).all()


@needs_ext
def test_block_lora_inference_path_equals_autograd_path():
    x, A, B, base, block_ids = lora_inputs(4, 5, 16, 20, 4, 6, [5, 0, -1, 5])
    with torch.no_grad():
        plain = ops.block_lora(x, A, B, block_ids, 1.5, base, backend="cpp")
    tracked = ops.block_lora(x, A, B, block_ids, 1.5, base, backend="cpp")
    assert tracked.requires_grad and not plain.requires_grad
    assert torch.equal(plain, tracked.detach())


@needs_ext
def test_block_lora_backward_is_deterministic_across_threads():
    x, A, B, base, block_ids = lora_inputs(16, 40, 96, 80, 4, 3, [0, 1, 2, -1] * 4)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n_threads in (threads, 1, threads):
            torch.set_num_threads(n_threads)
            runs.append(run_lora("cpp", x, A, B, block_ids, 1.0, base))
    finally:
        torch.set_num_threads(threads)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for got, first in zip(grads, runs[0][1], strict=True):
            assert torch.equal(got, first)


@needs_ext
def test_block_lora_training_one_block_only():
    """MELO trains one block: only A and B require grad (x and base are activations without grad)."""
    x, A, B, base, block_ids = lora_inputs(5, 3, 12, 14, 2, 4, [3, 3, -1, 3, 3])
    leaves = [A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()]
    out = ops.block_lora(x.detach(), leaves[0], leaves[1], block_ids, 4.0, base.detach(), backend="cpp")
    out.square().sum().backward()
    ref = [A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()]
    expected = ops.block_lora(x.detach(), ref[0], ref[1], block_ids, 4.0, base.detach(), backend="reference")
    expected.square().sum().backward()
    for got, want, name in zip(leaves, ref, ("grad_A", "grad_B"), strict=True):
        assert_close_fp32(got.grad, want.grad, name)
    assert (leaves[0].grad[:3] == 0).all()


@needs_ext
def test_block_lora_rejects_out_of_range_block():
    x, A, B, base, _ = lora_inputs(2, 1, 4, 4, 1, 3, [0, 0])
    with pytest.raises(RuntimeError, match="outside"):
        ops.block_lora(x.detach(), A.detach(), B.detach(), torch.tensor([0, 3]), 1.0, base.detach(), backend="cpp")


# ---- block_lora in place (inference) ---------------------------------------------------------------


def bits(t):
    """The raw bits of a float tensor (so NaN payloads compare too)."""
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


def poisoned_base(base, block_ids):
    """base with NaN in the rows of unedited samples: a kernel that wrote them would change the bits."""
    base = base.detach().clone()
    base[block_ids == -1] = float("nan")
    return base


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=lambda t: DTYPE_ID[t])
@pytest.mark.parametrize("case", LORA_CASES.values(), ids=LORA_CASES.keys())
def test_block_lora_inplace_equals_out_of_place_bitwise(case, dtype):
    n, t, d_in, d_out, ids, n_blocks = case
    x, A, B, base, block_ids = [v.detach() if v.is_floating_point() else v
                                for v in lora_inputs(n, t, d_in, d_out, 4, n_blocks, ids, dtype=dtype)]  # fmt: skip
    base = poisoned_base(base, block_ids)
    expected = ops.block_lora(x, A, B, block_ids, 1.75, base, backend="cpp")
    target = base.clone()
    version = target._version
    out = ops.block_lora(x, A, B, block_ids, 1.75, target, backend="cpp", inplace=True)
    assert out is target and out.dtype == dtype
    assert torch.equal(bits(out), bits(expected)), "in place must write exactly the out-of-place values"
    none = block_ids == -1
    assert torch.equal(bits(target[none]), bits(base[none])), "rows of block -1 must stay untouched"
    assert target._version > version


@needs_ext
def test_block_lora_inplace_multithreaded_model_width_and_decode_step():
    """Above the threading threshold (several threads on the edited rows only) and a decode step."""
    for n, t, ids in ((12, 40, [3, -1, 0, 0, -1, 7, 7, 7, -1, 1, 2, -1]), (8, 1, [0, -1, 5, -1, 5, 2, -1, 1])):
        x, A, B, base, block_ids = [v.detach() if v.is_floating_point() else v
                                    for v in lora_inputs(n, t, 256, 1024, 4, 8, ids)]  # fmt: skip
        base = poisoned_base(base, block_ids)
        expected = ops.block_lora(x, A, B, block_ids, 4.0, base, backend="cpp")
        target = base.clone()
        ops.block_lora(x, A, B, block_ids, 4.0, target, backend="cpp", inplace=True)
        assert torch.equal(bits(target), bits(expected))


@needs_ext
def test_block_lora_inplace_fallbacks_write_into_base():
    """Non-contiguous base (the kernel cannot write it) and float64 (no kernel): out of place + copy."""
    x, A, B, base, block_ids = [v.detach() if v.is_floating_point() else v
                                for v in lora_inputs(4, 6, 16, 20, 2, 3, [2, -1, 0, 2])]  # fmt: skip
    expected = ops.block_lora(x, A, B, block_ids, 2.0, base, backend="cpp")
    target = base.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    out = ops.block_lora(x, A, B, block_ids, 2.0, target, backend="cpp", inplace=True)
    assert out is target and not target.is_contiguous()
    assert torch.equal(target, expected)
    x64, A64, B64, base64 = (v.double() for v in (x, A, B, base))
    target = base64.clone()
    out = ops.block_lora(x64, A64, B64, block_ids, 2.0, target, backend="cpp", inplace=True)
    assert out is target and torch.equal(target, ops.block_lora(x64, A64, B64, block_ids, 2.0, base64, backend="torch"))


@needs_ext
def test_block_lora_inplace_rank_zero_empty_bank_and_nan_inputs():
    x, A, B, base, block_ids = [v.detach() if v.is_floating_point() else v
                                for v in lora_inputs(3, 2, 6, 5, 0, 2, [1, -1, 0])]  # fmt: skip
    target = base.clone()
    assert ops.block_lora(x, A, B, block_ids, 2.0, target, backend="cpp", inplace=True) is target
    assert torch.equal(target, ops.block_lora(x, A, B, block_ids, 2.0, base, backend="reference"))
    target = base.clone()
    ops.block_lora(x, A[:0], B[:0], torch.full((3,), -1), 2.0, target, backend="cpp", inplace=True)
    assert torch.equal(target, base)
    x, A, B, base, block_ids = [v.detach() if v.is_floating_point() else v
                                for v in lora_inputs(2, 3, 8, 8, 2, 2, [-1, 1])]  # fmt: skip
    x[0], A[0] = float("nan"), float("inf")  # only the unedited sample / the unused block see them
    target = base.clone()
    ops.block_lora(x, A, B, block_ids, 3.0, target, backend="cpp", inplace=True)
    assert torch.equal(target[0], base[0]) and torch.isfinite(target[1]).all()


@needs_ext
def test_block_lora_inplace_refuses_when_grads_are_needed():
    x, A, B, base, block_ids = lora_inputs(3, 4, 8, 6, 2, 2, [1, -1, 0])  # all four require grad
    for name, tensors in (
        ("x", (x, A.detach(), B.detach(), base.detach().clone())),
        ("A", (x.detach(), A, B.detach(), base.detach().clone())),
        ("B", (x.detach(), A.detach(), B, base.detach().clone())),
        ("base", (x.detach(), A.detach(), B.detach(), base)),
    ):
        before = tensors[3].detach().clone()
        with pytest.raises(ValueError, match=f"but {name} requires grad"):
            ops.block_lora(*tensors[:3], block_ids, 1.0, tensors[3], backend="cpp", inplace=True)
        assert torch.equal(tensors[3].detach(), before)
    with torch.no_grad():  # no graph is recorded: allowed, and the same values as out of place
        target = base.detach().clone()
        ops.block_lora(x, A, B, block_ids, 1.0, target, backend="cpp", inplace=True)
    assert torch.equal(target, ops.block_lora(x, A, B, block_ids, 1.0, base, backend="cpp").detach())


@needs_ext
def test_block_lora_inplace_and_inference_mode():
    x, A, B, base, block_ids = [v.detach() if v.is_floating_point() else v
                                for v in lora_inputs(3, 4, 8, 6, 2, 2, [1, -1, 0])]  # fmt: skip
    expected = ops.block_lora(x, A, B, block_ids, 1.0, base, backend="cpp")
    with torch.inference_mode():
        target = base.clone()
        ops.block_lora(x, A, B, block_ids, 1.0, target, backend="cpp", inplace=True)
    assert torch.equal(target, expected)
    with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):  # like any in-place op
        ops.block_lora(x, A, B, block_ids, 1.0, target, backend="cpp", inplace=True)
