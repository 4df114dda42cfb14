"""The C++ CPU backend's (``cpp``, csrc/) vecdb_search against the ``reference`` backend.

The tests skip when ``melo_fast._C`` was not built (tests/ops_cpp_helpers.py).
"""

import pytest
import torch

from melo_fast import ops
from tests.ops_cpp_helpers import DTYPE_ID, LOW, needs_ext

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
