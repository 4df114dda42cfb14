"""The vectorized ``torch`` backend against the ``reference`` (plain-loop) backend."""

import pytest
import torch

import melo_fast
from melo_fast import ops
from tests.tiny_models import block_tensors, build


def make_database(n_clusters, dim, points_per_cluster=3, radius=4.0, seed=0):
    """Random clusters; every point of cluster c sits near its center; blocks cycle 0..4."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g) * 3
    counts = torch.randint(0, points_per_cluster + 1, (n_clusters,), generator=g)
    offsets = torch.zeros(n_clusters + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    owner = torch.repeat_interleave(torch.arange(n_clusters), counts)
    points = centers[owner] + 0.5 * torch.randn(len(owner), dim, generator=g)
    blocks = torch.arange(len(owner), dtype=torch.int64) % 5
    radii = torch.full((n_clusters,), radius)
    return centers, radii, offsets, points, blocks


def search(queries, database, backend):
    return ops.vecdb_search(queries, *database, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ops_on_hand_made_values(backend):
    # Search (DESIGN §1): the nearest center decides, then its radius, then the nearest point of that
    # cluster only. Cluster 0: center (0, 0), radius 1, points (0, .5) -> block 3 and (4, 0) -> 6.
    # Cluster 1: center (10, 0), radius 6, points (9, 0) -> 4 and (12, 0) -> 5.
    database = (torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([1.0, 6.0]), torch.tensor([0, 2, 4]),
                torch.tensor([[0.0, 0.5], [4.0, 0.0], [9.0, 0.0], [12.0, 0.0]]), torch.tensor([3, 6, 4, 5]))
    queries = torch.tensor([[0.2, 0.2],  # cluster 0 at 0.28 <= 1: its point, block 3
                            [11.5, 0.0],  # cluster 1 at 1.5 <= 6: nearer point (12, 0), block 5
                            [4.8, 0.0],  # nearest center (0, 0) at 4.8 > 1: none, though (10, 0) is 5.2 <= 6 away
                            [5.5, 0.0]])  # cluster 1 at 4.5: its point (9, 0), block 4, not cluster 0's (4, 0)
    assert search(queries, database, backend).tolist() == [3, 5, -1, 4]
    # Block LoRA: base + scale (x A_b^T) B_b per sample, base alone for block -1. Sample 0, block 1:
    # [1, 2].[0, 1] = 2, 2 * [2, -1] * 3 = [12, -6], + [10, 20]. Sample 1, block 0: 3 * [1, 1] * 3 + [30, 40].
    x = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    A = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    B = torch.tensor([[[1.0, 1.0]], [[2.0, -1.0]]])
    base = torch.tensor([[[10.0, 20.0]], [[30.0, 40.0]]])
    out = ops.block_lora(x, A, B, torch.tensor([1, 0]), 3.0, base, backend=backend)
    assert out.tolist() == [[[22.0, 14.0]], [[39.0, 49.0]]]
    out = ops.block_lora(x, A, B, torch.tensor([1, -1]), 3.0, base, backend=backend)
    assert out.tolist() == [[[22.0, 14.0]], [[30.0, 40.0]]]


@pytest.mark.parametrize("n_queries", [1, 7, 33], ids=lambda n: f"Q{n}")
@pytest.mark.parametrize("n_clusters", [1, 7, 123], ids=lambda n: f"C{n}")
def test_search_matches_reference(n_queries, n_clusters):
    database = make_database(n_clusters, 16)
    queries = torch.cat([database[0][: n_queries // 2], torch.randn(n_queries - n_queries // 2, 16) * 3])
    expected = search(queries, database, "reference")
    assert torch.equal(search(queries, database, "torch"), expected)


def test_search_empty_database_all_miss_all_hit_and_ties():
    dim = 8
    empty = (
        torch.empty(0, dim),
        torch.empty(0),
        torch.zeros(1, dtype=torch.int64),
        torch.empty(0, dim),
        torch.empty(0, dtype=torch.int64),
    )
    queries = torch.randn(5, dim)
    for backend in ("reference", "torch"):
        assert search(queries, empty, backend).tolist() == [-1] * 5

    centers, radii, offsets, points, blocks = make_database(6, dim, radius=1e-3)
    far = torch.randn(4, dim) * 3
    assert search(far, (centers, radii, offsets, points, blocks), "torch").tolist() == [-1] * 4
    big = radii.new_full(radii.shape, 1e6)
    hit = search(far, (centers, big, offsets, points, blocks), "torch")
    assert torch.equal(hit, search(far, (centers, big, offsets, points, blocks), "reference"))

    # Exact ties: duplicate centers and duplicate points resolve to the lowest index.
    centers = torch.zeros(3, dim)
    offsets = torch.tensor([0, 1, 2, 4])
    points = torch.zeros(4, dim)
    blocks = torch.tensor([10, 11, 12, 13])
    tie = (centers, torch.ones(3), offsets, points, blocks)
    for backend in ("reference", "torch"):
        assert search(torch.zeros(2, dim), tie, backend).tolist() == [10, 10]
    tie = (centers[:1], torch.ones(1), torch.tensor([0, 4]), points, blocks)
    for backend in ("reference", "torch"):
        assert search(torch.zeros(1, dim), tie, backend).tolist() == [10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_search_low_precision_keys_match(dtype):
    database = make_database(40, 32)
    queries = (database[0][:10] + 0.1).to(dtype)
    low = tuple(t.to(dtype) if t.is_floating_point() else t for t in database)
    assert torch.equal(search(queries, low, "torch"), search(queries, low, "reference"))


@pytest.mark.parametrize("rank", [1, 2, 4, 8], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (5, 33)], ids=lambda s: f"N{s[0]}xT{s[1]}")
def test_block_lora_matches_reference_with_gradients(rank, shape):
    n, t = shape
    n_blocks, d_in, d_out = 6, 24, 40
    x = torch.randn(n, t, d_in, requires_grad=True)
    # Unit-scale outputs, so fp32 rounding stays well under atol 1e-5.
    A = (torch.randn(n_blocks, rank, d_in) / d_in**0.5).requires_grad_()
    B = (torch.randn(n_blocks, rank, d_out) / rank**0.5 / 3).requires_grad_()
    base = torch.randn(n, t, d_out, requires_grad=True)
    ids = torch.tensor([[0, n_blocks - 1, -1, 2][i % 4] for i in range(n)])
    grad_out = torch.randn(n, t, d_out)
    results = {}
    for backend in ("reference", "torch"):
        for tensor in (x, A, B, base):
            tensor.grad = None
        out = ops.block_lora(x, A, B, ids, 3.0, base=base, backend=backend)
        out.backward(grad_out)
        results[backend] = [out.detach()] + [t.grad.clone() for t in (x, A, B, base)]
    for got, expected in zip(results["torch"], results["reference"], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    out = results["torch"][0]
    assert torch.equal(out[ids == -1], base.detach()[ids == -1])  # unedited samples: bit for bit
    unused = sorted(set(range(n_blocks)) - set(ids.tolist()))
    assert torch.count_nonzero(results["torch"][2][unused]) == 0  # no gradient to absent blocks


def test_block_lora_without_base_and_with_empty_bank():
    x = torch.randn(3, 4, 8)
    A, B = torch.randn(2, 2, 8), torch.randn(2, 2, 5)
    ids = torch.tensor([1, -1, 0])
    for backend in ("reference", "torch"):
        out = ops.block_lora(x, A, B, ids, 1.0, backend=backend)
        assert torch.equal(out[1], torch.zeros(4, 5))
    empty = ops.block_lora(x, A[:0], B[:0], torch.full((3,), -1), 1.0, backend="torch")
    assert torch.equal(empty, torch.zeros(3, 4, 5))


def test_block_lora_bf16_close_to_fp32():
    x, A, B = torch.randn(4, 5, 32), torch.randn(3, 4, 32) * 0.1, torch.randn(3, 4, 48) * 0.1
    ids = torch.tensor([0, 2, -1, 1])
    expected = ops.block_lora(x, A, B, ids, 2.0, backend="reference")
    got = ops.block_lora(x.bfloat16(), A.bfloat16(), B.bfloat16(), ids, 2.0, backend="torch")
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def _inplace_inputs(n=6, t=5, d_in=24, d_out=40, n_blocks=4, rank=3):
    x = torch.randn(n, t, d_in)
    A, B = torch.randn(n_blocks, rank, d_in) / d_in**0.5, torch.randn(n_blocks, rank, d_out)
    ids = torch.tensor([[2, -1, 0, -1, 3, 2][i % 6] for i in range(n)])
    return x, A, B, ids, torch.randn(n, t, d_out)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_block_lora_inplace_writes_the_out_of_place_result_into_base(backend):
    """reference / torch: the dispatcher computes out of place and copies into base (one code path)."""
    x, A, B, ids, base = _inplace_inputs()
    expected = ops.block_lora(x, A, B, ids, 2.5, base, backend=backend)
    target = base.clone()
    version = target._version
    out = ops.block_lora(x, A, B, ids, 2.5, target, backend=backend, inplace=True)
    assert out is target
    assert torch.equal(out, expected)
    assert torch.equal(target[ids == -1], base[ids == -1])  # unedited rows: bit for bit
    assert target._version > version  # autograd knows base was written
    # Grad mode on but nothing requires grad: allowed; requires_grad tensors under no_grad: allowed.
    target = base.clone()
    ops.block_lora(x, A, B, ids, 2.5, target, backend=backend, inplace=True)
    assert torch.equal(target, expected)
    with torch.no_grad():
        target = base.clone()
        ops.block_lora(x.requires_grad_(), A, B, ids, 2.5, target.requires_grad_(), backend=backend, inplace=True)
    assert torch.equal(target.detach(), expected)


@pytest.mark.parametrize("backend", ["reference", "torch", None])
def test_block_lora_inplace_refuses_when_a_graph_is_needed(backend):
    x, A, B, ids, base = _inplace_inputs(n=3)
    for name in ("x", "A", "B", "base"):
        tensors = {"x": x, "A": A, "B": B, "base": base.clone()}
        tensors[name] = tensors[name].clone().requires_grad_()
        before = tensors["base"].detach().clone()
        with pytest.raises(ValueError, match=f"inplace=True is for inference only, but {name} requires grad"):
            ops.block_lora(tensors["x"], tensors["A"], tensors["B"], ids, 1.0, tensors["base"], backend=backend,
                           inplace=True)  # fmt: skip
        assert torch.equal(tensors["base"].detach(), before)  # refused before writing anything
    with pytest.raises(ValueError, match="base is None"):
        ops.block_lora(x, A, B, ids, 1.0, backend=backend, inplace=True)


def test_block_lora_inplace_empty_bank_and_all_unedited():
    x, A, B, _, base = _inplace_inputs(n=3)
    for backend in ("reference", "torch"):
        target = base.clone()
        out = ops.block_lora(x, A[:0], B[:0], torch.full((3,), -1), 1.0, target, backend=backend, inplace=True)
        assert out is target and torch.equal(target, base)


def test_op_errors_name_the_problem():
    x, A, B = torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="d_in=8"):
        ops.block_lora(x, torch.randn(2, 4, 9), B, torch.zeros(2, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        ops.block_lora(x, A.double(), B, torch.zeros(2, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="block_ids"):
        ops.block_lora(x, A, B, torch.zeros(3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.block_lora(x, A, B, torch.zeros(2, dtype=torch.int64), 1.0, backend="cuda")
    with pytest.raises(ValueError, match="centers"):
        ops.vecdb_search(
            torch.randn(2, 4),
            torch.randn(3, 5),
            torch.ones(3),
            torch.zeros(4, dtype=torch.int64),
            torch.randn(0, 5),
            torch.empty(0, dtype=torch.int64),
        )


def test_editing_with_reference_and_torch_backends_gives_the_same_model():
    """Same seed, same edits: the two backends train the same blocks and route the same way."""
    outputs, routes = {}, {}
    for backend in ("reference", "torch"):
        family = build("gpt2")
        editor = melo_fast.patch(family.model, melo_fast.MeloConfig(backend=backend, num_iter=10))
        torch.manual_seed(1)
        editor.edit_texts(["The capital of France is", "The sky is"], ["Rome", "green"], family.tokenizer)
        editor.edit_texts(["Water boils at"], ["fifty"], family.tokenizer)
        probe = family.tokenizer(
            ["The capital of France is", "Water boils at", "Dogs bark"], return_tensors="pt", padding=True
        )
        routes[backend] = editor.route(probe)
        with torch.no_grad():
            outputs[backend] = family.model(**probe).logits
        outputs[backend + "_B"] = next(iter(block_tensors(editor).values()))[1]
    assert torch.equal(routes["torch"], routes["reference"])
    torch.testing.assert_close(outputs["torch_B"], outputs["reference_B"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["torch"], outputs["reference"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_block_lora_with_each_samples_own_block_equals_the_whole_bank(backend):
    """``routed_blocks`` (what a layer casts under autocast instead of its whole bank) changes nothing."""
    from melo_fast.routing.lora import routed_blocks

    x, A, B, ids, base = _inplace_inputs(n=6, n_blocks=9)
    whole = ops.block_lora(x, A, B, ids, 2.0, base=base, backend=backend)
    own = ops.block_lora(x, *routed_blocks(A, B, ids), 2.0, base=base, backend=backend)
    assert torch.equal(own, whole)
