"""Parity of the Triton backend's vecdb_search with the reference op.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); every program instance then costs milliseconds, so the CPU shapes stay
small (a few dozen programs per launch) while still crossing tile boundaries. Helpers: tests/ops_triton_helpers.py.
"""

from __future__ import annotations

import pytest
import torch

import tests.ops_triton_helpers  # noqa: F401  (skips this module without a usable Triton)
from tests.ops_triton_helpers import (  # noqa: E402
    DEVICE,
    assert_same_ids,
    make_db,
    make_queries,
    search,
)

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


def test_search_fp64_matches_reference():
    db = make_db(20, 24, radius=1.0, dtype=torch.float64)
    queries = make_queries(db[0], 9)
    assert_same_ids(queries, db)
