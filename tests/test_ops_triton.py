"""Parity of the Triton backend with the reference ops.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); every program instance then costs milliseconds, so the CPU shapes stay
small (a few dozen programs per launch) while still crossing tile boundaries. GPU tests at the end
use the compiled kernels and larger shapes; they skip without CUDA.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from melo_fast import ops  # noqa: E402
from melo_fast.ops.triton import load  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

try:
    _backend = load()
except ImportError as err:  # triton present but unusable here (e.g. interpreter not enabled)
    pytest.skip(f"triton backend unavailable: {err}", allow_module_level=True)

from melo_fast.ops.triton import _launch  # noqa: E402
from melo_fast.ops.triton import block_lora as block_lora_module  # noqa: E402
from melo_fast.ops.triton import vecdb_search as vecdb_search_module  # noqa: E402
from melo_fast.ops.triton import warmup as triton_warmup  # noqa: E402
from melo_fast.ops.triton.block_lora import (  # noqa: E402
    block_lora_fwd,
    expand_config,
    project_config,
    token_tile,
)
from melo_fast.ops.triton.vecdb_search import scan_config, vecdb_search_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def make_db(n_centers, dim, cluster_sizes=None, radius=1.0, n_blocks=10, dtype=torch.float32, device=DEVICE):
    """Random database: points scattered around their centers, CSR offsets, some -1 blocks."""
    centers = torch.randn(n_centers, dim) * 3.0
    if cluster_sizes is None:
        cluster_sizes = torch.randint(0, 4, (n_centers,)).tolist()  # includes empty clusters
    offsets = torch.zeros(n_centers + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(cluster_sizes, dtype=torch.int64).cumsum(0)
    owner = torch.repeat_interleave(torch.arange(n_centers), torch.tensor(cluster_sizes, dtype=torch.int64))
    points = centers[owner] + 0.1 * torch.randn(len(owner), dim)
    blocks = torch.randint(-1, n_blocks, (len(owner),), dtype=torch.int64)
    radii = torch.full((n_centers,), float(radius))
    return [t.to(device) for t in (centers.to(dtype), radii, offsets, points.to(dtype), blocks)]


def make_queries(centers, n_queries, near=0.5, noise=0.05):
    """Half near a random center (hits, given a radius ≥ noise·√d), half far away (misses)."""
    dim = centers.shape[1]
    far = torch.randn(n_queries, dim) * 3.0 + 20.0
    if centers.shape[0] == 0:
        return far.to(centers.dtype).to(centers.device)
    pick = torch.randint(0, centers.shape[0], (n_queries,))
    close = centers.float().cpu()[pick] + noise * torch.randn(n_queries, dim)
    use_close = torch.rand(n_queries) < near
    return torch.where(use_close[:, None], close, far).to(centers.dtype).to(centers.device)


def search(backend, queries, db):
    centers, radii, offsets, points, blocks = db
    return ops.vecdb_search(queries, centers, radii, offsets, points, blocks, backend=backend)


def assert_same_ids(queries, db, **launcher_kwargs):
    expected = search("reference", queries, db)
    actual = search("triton", queries, db) if not launcher_kwargs else vecdb_search_fwd(queries, *db, **launcher_kwargs)
    assert actual.dtype == torch.int64 and actual.shape == expected.shape
    assert torch.equal(actual.cpu(), expected.cpu()), f"\ntriton:    {actual.tolist()}\nreference: {expected.tolist()}"
    return expected


def rel_close(actual, expected, rtol, what="output"):
    """Max error relative to the largest reference magnitude (robust to values near zero)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-6), f"{what}: max error {err:.3g} > {rtol} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _run_python(code, **env):
    full_env = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_package_import_does_not_import_triton():
    done = _run_python("import sys, melo_fast.ops.triton; print('triton' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_load_without_cuda_or_interpreter_says_why():
    code = (
        "from melo_fast.ops.triton import load\n"
        "try:\n    load()\nexcept ImportError as err:\n    print('ImportError:', err)\n"
    )
    done = _run_python(code, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stderr
    assert "ImportError:" in done.stdout and "TRITON_INTERPRET" in done.stdout


# ---------------------------------------------------------------------------------------------
# vecdb_search
# ---------------------------------------------------------------------------------------------

SEARCH_SHAPES = [(1, 1, 16), (7, 33, 40), (33, 7, 300), (123, 5, 16), (20, 123, 33)]


# Every dtype on a GPU; the interpreter skips fp16 here (test_search_split_scan_and_tiles covers it).
SEARCH_DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("n_queries,n_centers,dim", SEARCH_SHAPES, ids=[f"Q{q}-C{c}-d{d}" for q, c, d in SEARCH_SHAPES])
@pytest.mark.parametrize("dtype", SEARCH_DTYPES, ids=lambda dtype: str(dtype).replace("torch.", ""))
def test_search_matches_reference(n_queries, n_centers, dim, dtype):
    db = make_db(n_centers, dim, radius=0.1 * dim**0.5 + 0.5, dtype=dtype)
    queries = make_queries(db[0], n_queries)
    expected = assert_same_ids(queries, db)
    if n_queries >= 7:
        assert (expected >= 0).any() and (expected == -1).any(), "test data should mix hits and misses"


def test_search_empty_database():
    db = make_db(0, 16)
    queries = torch.randn(7, 16, device=DEVICE)
    assert torch.equal(search("triton", queries, db).cpu(), torch.full((7,), -1))
    assert_same_ids(queries, db)


def test_search_no_queries():
    db = make_db(5, 16)
    assert search("triton", torch.empty(0, 16, device=DEVICE), db).shape == (0,)


@pytest.mark.parametrize("radius,expect", [(1e6, "hit"), (0.0, "miss")], ids=["all-hit", "all-miss"])
def test_search_all_hit_all_miss(radius, expect):
    db = make_db(9, 24, cluster_sizes=[2] * 9, radius=radius)
    db[4] = torch.arange(18, device=DEVICE)  # every point has a real block
    queries = make_queries(db[0], 11, near=1.0)
    expected = assert_same_ids(queries, db)
    assert (expected >= 0).all() if expect == "hit" else (expected == -1).all()


def test_search_tied_centers_go_to_lowest_index():
    # Centers 1 and 4 are identical; their clusters hold points with different blocks.
    db = make_db(6, 16, cluster_sizes=[1] * 6, radius=1e6)
    centers, radii, offsets, points, blocks = db
    centers[4] = centers[1]
    points[4] = points[1]
    db[4] = torch.arange(6, device=DEVICE) + 100
    queries = centers[[1, 4, 1]] + 0.01 * torch.randn(3, 16, device=DEVICE)
    expected = assert_same_ids(queries, db)
    assert expected.tolist() == [101, 101, 101]


def test_search_tied_points_go_to_lowest_index():
    # One cluster of 20 points (crosses a 16-point tile); points 3 and 18 are identical and nearest.
    db = make_db(3, 16, cluster_sizes=[2, 20, 1], radius=1e6)
    centers, radii, offsets, points, blocks = db
    db[4] = torch.arange(points.shape[0], device=DEVICE)
    points[2 + 18] = points[2 + 3]
    query = points[2 + 3][None] + 1e-3
    expected = assert_same_ids(query, db)
    assert expected.tolist() == [2 + 3]


def test_search_empty_and_single_point_clusters():
    db = make_db(5, 16, cluster_sizes=[0, 1, 0, 40, 0], radius=1e6)
    db[4] = torch.arange(41, device=DEVICE)
    queries = db[0][[0, 1, 2, 3, 4]] + 0.01 * torch.randn(5, 16, device=DEVICE)
    expected = assert_same_ids(queries, db)
    assert expected[[0, 2, 4]].tolist() == [-1, -1, -1]  # nearest cluster is empty → none
    assert expected[1].item() == 0


def test_search_none_point_block():
    db = make_db(2, 16, cluster_sizes=[1, 1], radius=1e6)
    db[4] = torch.tensor([-1, 7], device=DEVICE)
    queries = db[0] + 0.01
    assert assert_same_ids(queries, db).tolist() == [-1, 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_search_split_scan_and_tiles(dtype):
    """Force many center tiles, several splits and a d loop so the partial top-2 reduction is used."""
    db = make_db(70, 40, radius=1.0, dtype=dtype)
    queries = make_queries(db[0], 20, near=0.7)
    assert_same_ids(queries, db, num_splits=3, block_c=16, block_d=16)


def test_search_precomputed_center_norms_and_mixed_dtypes():
    db = make_db(33, 20, radius=1.0, dtype=torch.bfloat16)
    queries = make_queries(db[0], 9).float()  # fp32 queries against a bf16 database
    sqnorms = db[0].float().pow(2).sum(-1)
    assert_same_ids(queries, db, center_sqnorms=sqnorms, num_splits=2, block_c=16)


def test_search_near_tie_needs_exact_recheck():
    # Large-norm centers: ||c||² ≈ 1.6e7, so ||c||² − 2q·c is only good to about ±1 while centers 1
    # and 2 differ in squared distance by ~1e-4: only the exact re-check of the two survivors can
    # order them. (The scan keeps two candidates: three centers that close would be out of reach.)
    base = torch.full((1, 16), 1000.0)
    centers = torch.cat([base + 1.0, base, base - 1e-2 * torch.linspace(0, 1, 16)[None]])
    offsets = torch.arange(4, dtype=torch.int64)
    db = [centers.to(DEVICE), torch.full((3,), 1e6, device=DEVICE), offsets.to(DEVICE), centers.to(DEVICE),
          torch.tensor([10, 11, 12], device=DEVICE)]  # fmt: skip
    queries = (base + torch.tensor([[0.9], [0.0], [-4e-3], [-6e-3]])).to(DEVICE)
    assert assert_same_ids(queries, db).tolist() == [10, 11, 12, 12]


# ---------------------------------------------------------------------------------------------
# block_lora
# ---------------------------------------------------------------------------------------------

# (N, T, d_in, d_out, n_blocks, k, block ids): odd sizes, both ends of the bank, -1 samples,
# several samples on one block, and a block that no sample uses.
LORA_CASES = [
    (1, 1, 16, 16, 1, 1, [0]),
    (3, 7, 33, 17, 4, 2, [0, -1, 3]),
    (5, 33, 40, 70, 6, 4, [5, 2, 2, -1, 0]),
    (7, 5, 123, 33, 3, 8, [-1, 2, 0, 0, -1, 2, 2]),
    (2, 70, 300, 300, 2, 2, [1, -1]),  # several token, d_in and d_out tiles
    (70, 1, 16, 20, 3, 1, [(i * 7) % 4 - 1 for i in range(70)]),  # more samples than one id chunk
]
LORA_IDS = [f"N{c[0]}-T{c[1]}-in{c[2]}-out{c[3]}-blocks{c[4]}-k{c[5]}" for c in LORA_CASES]


def make_lora(n, t, d_in, d_out, n_blocks, k, ids, dtype=torch.float32, device=DEVICE):
    x = torch.randn(n, t, d_in) / d_in**0.25
    A = torch.randn(n_blocks, k, d_in) / d_in**0.25
    B = torch.randn(n_blocks, k, d_out) / k**0.5
    base = torch.randn(n, t, d_out)
    block_ids = torch.tensor(ids, dtype=torch.int64)
    return [v.to(device=device, dtype=dtype) for v in (x, A, B, base)] + [block_ids.to(device)]


def lora_with_grads(backend, x, A, B, base, block_ids, scale, grad_out, use_base=True):
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, A, B, base)]
    out = ops.block_lora(leaves[0], leaves[1], leaves[2], block_ids, scale, leaves[3] if use_base else None,
                         backend=backend)  # fmt: skip
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


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


# ---------------------------------------------------------------------------------------------
# fp64, aliasing
# ---------------------------------------------------------------------------------------------


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


def test_search_fp64_matches_reference():
    db = make_db(20, 24, radius=1.0, dtype=torch.float64)
    queries = make_queries(db[0], 9)
    assert_same_ids(queries, db)


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


# ---------------------------------------------------------------------------------------------
# Launching: device, work per launch, compiled variants
# ---------------------------------------------------------------------------------------------


def _kernels():
    """Every Triton kernel of the backend, by module attribute."""
    return [(module, name) for module in (block_lora_module, vecdb_search_module) for name in dir(module)
            if name.startswith("_") and name.endswith("_kernel")]  # fmt: skip


def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    """Triton launches on the *current* CUDA device: each launch must first make the tensors' device current."""
    entered = []

    @contextlib.contextmanager
    def fake_guard(device):
        entered.append(device)
        try:
            yield
        finally:
            entered.pop()

    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                tensors = {a.device for a in args if isinstance(a, torch.Tensor)}
                seen.append((self.kernel, list(entered), tensors))
                return self.kernel[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(_launch, "device_guard", fake_guard)
    for module, name in _kernels():
        monkeypatch.setattr(module, name, Spy(getattr(module, name)))
    x, A, B, base, block_ids = make_lora(3, 5, 16, 20, 2, 2, [1, -1, 0])
    lora_with_grads("triton", x, A, B, base, block_ids, 2.0, torch.ones_like(base))
    with torch.no_grad():
        ops.block_lora(x, A, B, block_ids, 2.0, base.clone(), backend="triton", inplace=True)
    db = make_db(9, 16)
    search("triton", make_queries(db[0], 4), db)
    assert len({id(kernel) for kernel, _, _ in seen}) == len(_kernels()), "every kernel should have run"
    for kernel, guards, devices in seen:
        assert guards == [next(iter(devices))] and len(devices) == 1, f"{kernel} launched under {guards}"


def test_device_guard_makes_the_tensors_cuda_device_current():
    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_forward_reads_x_once_per_token_tile():
    """h = x A_b^T once per (sample, token tile), not once per output tile (x re-read d_out/BLOCK_D times)."""
    n, t, d_in, d_out = 2, 20, 16, 300  # 3 output tiles of 128 with the GPU configuration
    x, A, B, base, block_ids = make_lora(n, t, d_in, d_out, 2, 2, [1, 0])
    with _launch.record_launches(as_gpu=True) as launches:
        out, _ = block_lora_fwd(x, A, B, block_ids, 2.0, base)
    rel_close(out, ops.block_lora(x, A, B, block_ids, 2.0, base, backend="reference"), 1e-5)
    readers = [launch for launch in launches if any(arg is x for arg in launch.args)]
    assert len(readers) == 1, [launch.name for launch in readers]
    block_t = readers[0].kwargs["BLOCK_T"]
    assert readers[0].grid == (n, -(-t // block_t)), f"x is read by {readers[0].programs} programs"
    writers = [launch for launch in launches if any(arg is out for arg in launch.args)]
    assert writers and writers[0].grid[2] == 3, "the output tiles are spread over programs"


def test_tile_buckets_and_warmup_cover_them():
    assert {token_tile(t) for t in range(1, 5000)} == {16, 64}
    assert {token_tile(t) for t in triton_warmup.TOKEN_COUNTS} == {16, 64}
    for dot_fp32 in (True, False):
        query_tiles = {scan_config(q, 1000, 768, dot_fp32, True)["BLOCK_Q"] for q in range(1, 600)}
        assert query_tiles == {scan_config(q, 1000, 768, dot_fp32, True)["BLOCK_Q"] for q in triton_warmup.QUERY_COUNTS}
        configs = {tuple(sorted(scan_config(32, c, 768, dot_fp32, True).items())) for c in (1, 17, 10**3, 10**6)}
        assert len(configs) == 1, "the scan configuration must not depend on the database size"
    for dtype in (torch.float32, torch.bfloat16):
        assert len({tuple(sorted(expand_config(t, 4096, dtype, True).items())) for t in range(1, 3000)}) == 2
        assert len({tuple(sorted(project_config(4096, dtype, True).items()))}) == 1


_VARIANTS_SCRIPT = """
import torch
from benchmarks.gpu_stages import compile_report
from melo_fast.ops.triton import _launch
from melo_fast.ops.triton.warmup import warmup

dtypes = (torch.bfloat16, torch.float32)
with _launch.record_launches(execute=False, as_gpu=True) as warm:
    for dtype in dtypes:
        warmup(torch.device("cpu"), [(64, 48, 4)], key_dim=32, dtype=dtype)
with _launch.record_launches(execute=False, as_gpu=True) as serving:
    compile_report.serving_sweep((64, 48, 4), 32, dtypes, torch.device("cpu"))
warm_keys = {compile_report.variant_key(launch) for launch in warm}
extra = {compile_report.variant_key(launch) for launch in serving} - warm_keys
print("warm-up variants:", len(warm_keys), "serving launches:", len(serving), "not warmed up:", len(extra))
for key in sorted(extra):
    print("EXTRA", key)
"""


def test_serving_shapes_compile_nothing_after_warmup():
    """Growing banks and databases, decode steps and new batch sizes reuse the warmed-up variants.

    Checked with Triton's own argument binder for an sm_90 target (integer and alignment
    specialization included), in a process where the kernels are compiled @triton.jit functions.
    """
    pytest.importorskip("triton.runtime.jit")
    done = _run_python(_VARIANTS_SCRIPT, TRITON_INTERPRET="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not warmed up: 0" in done.stdout, done.stdout


def test_public_warmup_is_a_no_op_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: warm-up really compiles (tests/test_gpu_check.py runs it on a GPU)")
    assert ops.warmup([(16, 16, 2)], key_dim=8, dtype=torch.bfloat16) == 0


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels, larger shapes, host synchronization
# ---------------------------------------------------------------------------------------------

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


def test_editor_warmup_passes_the_model_shapes(monkeypatch):
    """``editor.warmup()`` (called by ``patch()`` on CUDA) compiles exactly the targets' shapes and dtype."""
    import melo_fast
    from tests.tiny_models import build

    calls = []
    monkeypatch.setattr(ops, "warmup", lambda *args, **kwargs: calls.append((args, kwargs)) or 7)
    family = build("gpt2")
    family.model.to(torch.bfloat16)
    editor = melo_fast.patch(family.model)
    assert editor.warmup(training=False) == 7
    (shapes, key_dim), kwargs = calls[0]
    assert shapes == [(64, 256, 4), (64, 256, 4)] and key_dim == 256
    assert kwargs == {"dtype": torch.bfloat16, "device": torch.device("cpu"), "training": False}
    melo_fast.unpatch(family.model)
    assert melo_fast.patch(family.model, melo_fast.MeloConfig(backend="cpp")).warmup() == 0
