"""The C++ CPU backend (``cpp``, csrc/) against the ``reference`` backend.

Extension tests skip when ``melo_fast._C`` was not built; the fallback tests (package imports and
the ops work without it) always run.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import melo_fast
from melo_fast import ops
from melo_fast.ops import cpp

try:
    cpp.load()
    _EXT_ERROR = None
except ImportError as err:  # not built here: only the fallback tests run
    _EXT_ERROR = str(err)

needs_ext = pytest.mark.skipif(_EXT_ERROR is not None, reason=f"cpp backend unavailable: {_EXT_ERROR}")
ROOT = Path(__file__).resolve().parents[1]
LOW = [torch.bfloat16, torch.float16]
DTYPE_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---- vecdb_search ---------------------------------------------------------------------------------


def make_database(n_clusters, dim, sizes=(0, 1, 2, 3), radius=3.0, seed=0):
    """Clusters around random centers; cluster c gets sizes[c % len(sizes)] points near its center."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g)
    counts = torch.tensor([sizes[c % len(sizes)] for c in range(n_clusters)], dtype=torch.int64)
    offsets = torch.zeros(n_clusters + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    owner = torch.repeat_interleave(torch.arange(n_clusters), counts)
    points = centers[owner] + 0.3 * torch.randn(len(owner), dim, generator=g)
    blocks = torch.arange(len(owner), dtype=torch.int64) % 7 - 1  # includes -1 ("none") points
    radii = torch.full((n_clusters,), radius) * (0.5 + torch.rand(n_clusters, generator=g))
    return centers, radii, offsets, points, blocks


def near_queries(centers, n, noise, seed=1):
    """n queries: noisy copies of centers (cycling), so some hit and some miss depending on noise."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.arange(n) % max(len(centers), 1)
    return centers[picks] + noise * torch.randn(n, centers.shape[1], generator=g)


def search(queries, database, backend):
    return ops.vecdb_search(queries, *database, backend=backend)


def assert_same_search(queries, database):
    expected = search(queries, database, "reference")
    got = search(queries, database, "cpp")
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert torch.equal(got, expected), f"cpp {got.tolist()} != reference {expected.tolist()}"
    return expected


@needs_ext
@pytest.mark.parametrize("size", [1, 7, 33, 123], ids=lambda n: f"Q{n}-d{n}-C{n}")
def test_search_odd_sizes(size):
    database = make_database(size, size)
    queries = near_queries(database[0], size, noise=0.15)
    result = assert_same_search(queries, database)
    if size > 1:
        assert (result >= 0).any() and (result == -1).any()  # both outcomes exercised


@needs_ext
@pytest.mark.parametrize("n_queries", [1, 5, 64], ids=lambda n: f"Q{n}")
def test_search_model_width(n_queries):
    """d = 768 as in the benchmarks; tiles, register blocks and thread chunks all have leftovers."""
    database = make_database(301, 768, sizes=(1, 2))
    queries = near_queries(database[0], n_queries, noise=0.05)
    assert_same_search(queries, database)


@needs_ext
def test_search_many_centers_against_torch_backend():
    """More centers than the thread chunks' minimum: every chunk's candidates are merged."""
    database = make_database(3000, 64, sizes=(1, 3))
    queries = torch.cat([near_queries(database[0], 40, noise=0.2), torch.randn(9, 64) * 3])
    assert torch.equal(search(queries, database, "cpp"), search(queries, database, "torch"))


@needs_ext
def test_search_empty_database():
    dim = 9
    empty = (torch.empty(0, dim), torch.empty(0), torch.zeros(1, dtype=torch.int64),
             torch.empty(0, dim), torch.empty(0, dtype=torch.int64))
    assert search(torch.randn(4, dim), empty, "cpp").tolist() == [-1] * 4
    assert search(torch.randn(0, dim), empty, "cpp").tolist() == []


@needs_ext
def test_search_no_points_at_all():
    centers, radii, _, _, _ = make_database(5, 8)
    database = (centers, radii, torch.zeros(6, dtype=torch.int64), torch.empty(0, 8), torch.empty(0, dtype=torch.int64))
    assert search(centers, database, "cpp").tolist() == [-1] * 5


@needs_ext
def test_search_all_hit_and_all_miss():
    centers, radii, offsets, points, _ = make_database(50, 32, sizes=(1, 2, 3))
    blocks = torch.arange(len(points))
    queries = near_queries(centers, 50, noise=0.01)
    hit = assert_same_search(queries, (centers, radii + 100.0, offsets, points, blocks))
    assert (hit >= 0).all()
    assert assert_same_search(queries, (centers, radii * 0.0, offsets, points, blocks)).tolist() == [-1] * 50


@needs_ext
def test_search_ties_go_to_the_lowest_index():
    dim = 16
    # Duplicate centers: the first copy wins; its duplicate points: the first point wins.
    centers = torch.randn(1, dim).repeat(4, 1)
    offsets = torch.tensor([0, 3, 4, 5, 6])
    points = torch.cat([centers[:1].repeat(3, 1), torch.randn(3, dim)])
    blocks = torch.tensor([21, 22, 23, 24, 25, 26])
    database = (centers, torch.ones(4), offsets, points, blocks)
    assert assert_same_search(centers[:2], database).tolist() == [21, 21]
    # Exactly equidistant centers (mirror images around the query): lowest index, whatever order.
    e = torch.zeros(3, dim)
    e[:, 0] = torch.tensor([2.0, -2.0, 2.0])
    database = (e, torch.full((3,), 5.0), torch.tensor([0, 1, 2, 3]), e.clone(), torch.tensor([7, 8, 9]))
    assert assert_same_search(torch.zeros(1, dim), database).tolist() == [7]
    flipped = (e.flip(0), *database[1:])
    assert assert_same_search(torch.zeros(1, dim), flipped).tolist() == [7]
    # Hundreds of exact ties (more than a candidate list holds before pruning).
    many = torch.randn(1, dim).repeat(300, 1)
    database = (many, torch.ones(300), torch.arange(301), many, torch.arange(300) + 100)
    assert search(many[:3] + 0.01, database, "cpp").tolist() == [100] * 3


@needs_ext
def test_search_empty_cluster_and_none_points():
    dim = 8
    centers = torch.tensor([[0.0] * dim, [10.0] * dim])
    offsets = torch.tensor([0, 0, 2])  # cluster 0 has no points
    points = torch.stack([centers[1], centers[1] + 0.1])
    database = (centers, torch.full((2,), 1.0), offsets, points, torch.tensor([-1, 5]))
    queries = torch.stack([centers[0], centers[1], centers[1] + 0.11])
    assert assert_same_search(queries, database).tolist() == [-1, -1, 5]


@needs_ext
@pytest.mark.parametrize("size", [1, 200], ids=["cluster1", "cluster200"])
def test_search_cluster_sizes(size):
    dim = 24
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(3, dim, generator=g) * 5
    offsets = torch.tensor([0, 1, 1 + size, 2 + size])
    owner = torch.tensor([0] + [1] * size + [2])
    points = centers[owner] + torch.randn(len(owner), dim, generator=g)
    blocks = torch.arange(len(owner))
    queries = centers[1] + torch.randn(9, dim, generator=g)
    result = assert_same_search(queries, (centers, torch.full((3,), 100.0), offsets, points, blocks))
    assert ((result >= 1) & (result <= size)).all()


@needs_ext
@pytest.mark.parametrize("dtype", LOW, ids=lambda t: DTYPE_ID[t])
def test_search_low_precision_keys(dtype):
    """16-bit keys are widened exactly, so block ids equal the reference's on the same keys."""
    database = make_database(123, 96, sizes=(1, 2, 3))
    queries = near_queries(database[0], 33, noise=0.15).to(dtype)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in database)
    result = assert_same_search(queries, low)
    assert (result >= 0).any() and (result == -1).any()
    # Mixed storage (bf16 queries against fp32 centers and points) works too.
    assert_same_search(queries, database)


@needs_ext
def test_search_float64_inputs():
    database = tuple(t.double() if t.is_floating_point() else t for t in make_database(20, 12))
    assert_same_search(near_queries(database[0], 7, noise=0.2), database)


@needs_ext
def test_search_rejects_malformed_offsets():
    centers = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="point_offsets"):
        search(centers, (centers, torch.ones(2), torch.tensor([0, 3, 1]), torch.randn(3, 4),
                         torch.zeros(3, dtype=torch.int64)), "cpp")


@needs_ext
def test_search_on_cuda_tensors_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    centers = torch.randn(2, 4, device="cuda")
    with pytest.raises(RuntimeError, match="CPU"):
        search(centers, (centers, torch.ones(2, device="cuda"), torch.tensor([0, 1, 2], device="cuda"), centers,
                         torch.zeros(2, dtype=torch.int64, device="cuda")), "cpp")


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


# ---- portability and fallback ---------------------------------------------------------------------


def run_python(code, **env):
    """Run code in a fresh interpreter from the repository root; returns (stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


PARITY_SCRIPT = textwrap.dedent("""
    import logging, torch
    logging.basicConfig(level=logging.WARNING)
    import melo_fast
    from melo_fast import ops
    print(ops.backend_status()["cpp"])
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(37, 40, generator=g)
    offsets = torch.arange(0, 75, 2)
    points = centers.repeat_interleave(2, 0) + 0.1 * torch.randn(74, 40, generator=g)
    db = (centers, torch.full((37,), 1.0), offsets, points, torch.arange(74) % 5)
    queries = torch.cat([centers[:9] + 0.05 * torch.randn(9, 40, generator=g), torch.randn(4, 40, generator=g)])
    assert torch.equal(ops.vecdb_search(queries, *db), ops.vecdb_search(queries, *db, backend="reference"))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 40, generator=g).to(dtype)
        A = torch.randn(4, 2, 40, generator=g).to(dtype).requires_grad_()
        B = torch.randn(4, 2, 24, generator=g).to(dtype).requires_grad_()
        ids = torch.tensor([3, -1, 0])
        auto = ops.block_lora(x, A, B, ids, 2.0)
        ref = ops.block_lora(x, A, B, ids, 2.0, backend="reference")
        torch.testing.assert_close(auto, ref, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=1e-2)
        auto.sum().backward()
    print("ok")
""")


def test_package_works_without_the_extension():
    """MELO_FAST_NO_EXT=1: melo_fast imports, cpp reports why, ops fall back to torch with one log line."""
    stdout, stderr = run_python(PARITY_SCRIPT, MELO_FAST_NO_EXT="1")
    lines = stdout.split("\n")
    assert lines[0].startswith("unavailable") and "MELO_FAST_NO_EXT=1" in lines[0]
    assert lines[1] == "ok"
    fallback = [line for line in stderr.splitlines() if "C++ CPU backend unavailable" in line]
    assert len(fallback) == 1, stderr


def test_loader_reports_a_missing_build(monkeypatch):
    """An absent (or broken) melo_fast._C gives ImportError("extension not built: ..."), no crash."""
    monkeypatch.delenv("MELO_FAST_NO_EXT", raising=False)
    monkeypatch.setattr(cpp, "_ext", None)
    monkeypatch.delattr(melo_fast, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "melo_fast._C", None)  # makes `from melo_fast import _C` fail
    with pytest.raises(ImportError, match="extension not built"):
        cpp.load()
    assert ops.backend_status()["cpp"].startswith("unavailable: extension not built")
    x = torch.randn(2, 3, 4)
    out = ops.block_lora(x, torch.randn(1, 1, 4), torch.randn(1, 1, 5), torch.tensor([0, -1]), 1.0, backend="torch")
    assert out.shape == (2, 3, 5)


ISA_PARITY_SCRIPT = textwrap.dedent("""
    import torch
    from melo_fast import ops
    from melo_fast.ops import cpp
    print(cpp.isa())
    g = torch.Generator().manual_seed(0)

    # Search: odd sizes (not multiples of any vector width), clusters of 1-3 points, hits and misses.
    centers = torch.randn(53, 37, generator=g)
    sizes = torch.arange(53) % 3 + 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    points = centers.repeat_interleave(sizes, 0) + 0.1 * torch.randn(int(sizes.sum()), 37, generator=g)
    blocks = torch.arange(points.shape[0]) % 7
    queries = torch.cat([points[::3] + 0.02 * torch.randn(points[::3].shape, generator=g),
                         torch.randn(11, 37, generator=g)])
    for dtype in (torch.float32, torch.bfloat16):
        db = (centers.to(dtype), torch.full((53,), 0.5), offsets, points.to(dtype), blocks)
        got = ops.vecdb_search(queries.to(dtype), *db, backend="cpp")
        assert torch.equal(got, ops.vecdb_search(queries.to(dtype), *db, backend="reference")), dtype

    # Block LoRA: forward (out of place, in place) and every gradient, against the fp64 reference.
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(5, 7, 41, generator=g)
        A = torch.randn(4, 3, 41, generator=g) / 41 ** 0.5
        B = torch.randn(4, 3, 29, generator=g)
        base = torch.randn(5, 7, 29, generator=g)
        grad = torch.randn(5, 7, 29, generator=g)
        ids = torch.tensor([3, -1, 0, 3, 1])
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, A, B, base)]
        out = ops.block_lora(*leaves[:3], ids, 1.5, base=leaves[3], backend="cpp")
        out.backward(grad.to(dtype))
        exact = [t.detach().double().requires_grad_() for t in (x, A, B, base)]
        expected = ops.block_lora(*exact[:3], ids, 1.5, base=exact[3], backend="reference")
        expected.backward(grad.double())
        def close(name, got, want):
            error = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
            assert error <= tol, (dtype, name, error)
        close("out", out, expected)
        for name, leaf, ref in zip(("grad_x", "grad_A", "grad_B", "grad_base"), leaves, exact):
            close(name, leaf.grad, ref.grad)
        with torch.no_grad():
            inplace = base.to(dtype).clone()
            ops.block_lora(x.to(dtype), A.to(dtype), B.to(dtype), ids, 1.5, base=inplace, backend="cpp", inplace=True)
        close("inplace", inplace, expected)
        assert torch.equal(inplace[1], base.to(dtype)[1])  # block -1: untouched
    print("ok")
""")


def test_every_code_path_matches_the_reference(cpu_isa_path):
    """Each ISA's kernels (forced via MELO_FAST_ISA), every output and gradient, at fp32 tolerance."""
    stdout, _ = run_python(ISA_PARITY_SCRIPT, MELO_FAST_ISA=cpu_isa_path)
    assert stdout.split("\n")[:2] == [cpu_isa_path, "ok"]


@pytest.fixture(params=["baseline", "avx2", "avx512"])
def cpu_isa_path(request):
    if _EXT_ERROR is not None:
        pytest.skip(f"cpp backend unavailable: {_EXT_ERROR}")
    order = ["baseline", "avx2", "avx512"]
    if order.index(request.param) > order.index(cpp.isa()):
        pytest.skip(f"this CPU has no {request.param}")
    return request.param
