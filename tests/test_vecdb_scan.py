"""The insert's scan is exact where a matrix-product distance is not: near-ties, large key norms, duplicates."""

import pytest
import torch

from melo_fast.vecdb import VectorDatabase
from melo_fast.vecdb.scan import scan, squared_norms
from tests.conftest import requires_cuda


def brute_force(queries, centers, excluded=None):
    """Nearest center by the rules' distance (float32 vector_norm), ties to the lowest index."""
    nearest, distance = [], []
    for query in queries:
        d = torch.linalg.vector_norm(query - centers, dim=1)
        if excluded is not None:
            d = d.masked_fill(excluded, float("inf"))
        best = int(torch.argmin(d))  # the first minimum
        nearest.append(best if torch.isfinite(d[best]) else -1)
        distance.append(d[best].item())
    return nearest, distance


@pytest.mark.parametrize("norm", [1.0, 1e4])
def test_scan_finds_the_exact_nearest_among_near_ties(norm):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g) * norm / 8
    # 3000 centers within 1e-3 of each other around a point of norm `norm`: at 1e4 the scores
    # ||c||² - 2 q·c round by ~10, far more than the distances differ (GEMM alone picks wrong ones).
    centers = base + 1e-3 * torch.randn(3000, 64, generator=g)
    centers[1234] = centers[17]  # an exact duplicate: the lower index must win
    queries = torch.cat([base + 1e-3 * torch.randn(20, 64, generator=g), centers[1234:1235]])
    found = scan(queries, centers, squared_norms(centers))
    expected, distance = brute_force(queries, centers)
    assert found.nearest.tolist() == expected
    assert found.distance.tolist() == distance
    assert expected[-1] == 17


def test_scan_excludes_centers_and_reports_pairs_within_reach():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(500, 16, generator=g)
    queries = centers[:40] + 0.05 * torch.randn(40, 16, generator=g)
    excluded = torch.zeros(500, dtype=torch.bool)
    excluded[:20] = True
    within = torch.full((500,), 5.0)
    within[::3] = -float("inf")  # clusters without points: never in reach
    found = scan(queries, centers, squared_norms(centers), within=within, excluded=excluded)
    assert found.nearest.tolist() == brute_force(queries, centers, excluded)[0]
    distances = torch.cdist(queries.double(), centers.double()).float()
    truly = {(q, c) for q, c in (distances <= within[None, :]).nonzero().tolist() if not excluded[c]}
    reported = {
        (q, c) for q, c, w in zip(found.pair_queries.tolist(), found.pair_centers.tolist(), found.pair_within.tolist(),
                                  strict=True) if w
    }
    # Up to pairs right on the edge (float32 vs double distances), the reported pairs are the true ones.
    edge = {(q, c) for q, c in truly ^ reported if abs(distances[q, c] - within[c]) > 1e-5}
    assert not edge and len(truly) > 100


def test_identical_keys_of_large_norm_with_two_targets_are_refused():
    # torch.cdist of more than 25 rows goes through a matrix product: identical keys of norm ~3e4 come
    # out about 11 apart, beyond the tolerance (1.0 here), and the clash went unnoticed.
    keys = torch.randn(40, 768, generator=torch.Generator().manual_seed(0)) * 100 + 1000
    keys[30] = keys[3]
    labels = [(i,) for i in range(40)]
    db = VectorDatabase(768, init_radius=10.0)
    with pytest.raises(ValueError, match=r"rows \[\(3, 30\)\]"):
        db.insert(keys, labels, 0)
    assert len(db) == 0


@requires_cuda
@pytest.mark.parametrize(("kind", "expected"), [("new", 6), ("merges", 7)])
def test_an_insert_synchronizes_the_host_a_fixed_number_of_times(kind, expected):
    """The count documented in melo_fast/vecdb/insert.py (not run where this was written: no GPU there)."""
    import warnings

    g = torch.Generator().manual_seed(0)
    stored = torch.randn(1000, 64, generator=g) * 10
    db = VectorDatabase(64, init_radius=1.0, device="cuda")
    db.insert(stored.cuda(), [(1,)] * 1000, 0)
    keys = torch.randn(100, 64, generator=g) * 10  # far from every stored key: new clusters
    if kind == "merges":
        keys[:10] = stored[:10] + 0.1  # 0.8 from stored keys of the same label: merges
    keys = keys.cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            counts = db.copy().insert(keys, [(1,)] * 100, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert counts.merged == (10 if kind == "merges" else 0)
    assert len(syncs) == expected, [str(w.message)[:80] for w in syncs]
