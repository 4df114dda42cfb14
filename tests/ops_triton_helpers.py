"""Helpers of the Triton backend's tests (``tests/test_ops_triton_*.py``): random databases, queries and LoRA
cases, comparisons with the reference backend, and a child Python process.

Importing it skips the importing test module when Triton is not installed or its backend does not load
here (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA, before triton is imported), so each test
module imports it first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from melo_fast import ops  # noqa: E402
from melo_fast.ops.triton import load  # noqa: E402

try:
    load()
except ImportError as err:  # triton present but unusable here (e.g. interpreter not enabled)
    pytest.skip(f"triton backend unavailable: {err}", allow_module_level=True)

from melo_fast.ops.triton.vecdb_search import vecdb_search_fwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def _run_python(code, **env):
    full_env = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


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
