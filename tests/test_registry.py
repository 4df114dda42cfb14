"""The backend registry (one protocol, name → loader) and the custom ops the compiled kernels run as."""

from __future__ import annotations

import pytest
import torch

from melo_fast import ops
from melo_fast.ops import registry
from melo_fast.ops.custom_ops import KernelBackend
from melo_fast.ops.registry import Backend


def _available(name):
    try:
        return registry.load(name)
    except ImportError as err:
        pytest.skip(f"{name} backend unavailable: {err}")


@pytest.mark.parametrize("name", registry.BACKENDS)
def test_every_name_loads_a_backend_of_that_name(name):
    backend = _available(name)
    assert isinstance(backend, Backend) and backend.name == name
    assert isinstance(backend, KernelBackend) == (name in ("cpp", "triton"))
    assert registry.load(name) is backend  # one object per backend: its identity is stable


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*'reference', 'torch', 'cpp', 'triton'"):
        registry.load("cuda")


def test_the_automatic_choice_on_cpu_is_the_cpp_backend_when_it_runs():
    expected = "cpp" if registry.backend_status()["cpp"] == "available" else "torch"
    assert registry.resolve(None, torch.device("cpu")).name == expected


def test_the_default_in_place_op_writes_the_out_of_place_result_into_base():
    class Doubling(Backend):
        name = "doubling"

        def block_lora(self, x, A, B, block_ids, scale, base):
            return base * 2

    base = torch.ones(2, 3, 4)
    out = Doubling().block_lora_inplace(None, None, None, None, 1.0, base)
    assert out is base and torch.equal(base, torch.full((2, 3, 4), 2.0))


def _lora_inputs(requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g)
    A = torch.randn(2, 4, 8, generator=g)
    B = torch.randn(2, 4, 6, generator=g)
    base = torch.randn(3, 5, 6, generator=g)
    for t in (x, A, B, base):
        t.requires_grad_(requires_grad)
    return x, A, B, torch.tensor([1, -1, 0]), base


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_the_custom_ops_pass_torch_opcheck(name):
    """Schema, fake implementation, autograd registration and dispatch agree (torch.library.opcheck)."""
    backend = _available(name)
    x, A, B, ids, base = _lora_inputs(requires_grad=True)
    # The saved hidden's rows of unedited samples are never written (nor read): compare it where every
    # sample is edited.
    every_row_edited = torch.tensor([1, 0, 1])
    torch.library.opcheck(
        torch.ops.melo_fast.block_lora.default, (x, A, B, every_row_edited, 1.5, base, backend.name, True)
    )
    # Without the saved hidden, B takes no gradient (the ops' wrapper saves it whenever B requires grad).
    frozen_B = B.detach()
    torch.library.opcheck(
        torch.ops.melo_fast.block_lora.default, (x, A, frozen_B, ids, 1.5, None, backend.name, False)
    )
    x, A, B, ids, base = _lora_inputs(requires_grad=False)
    torch.library.opcheck(torch.ops.melo_fast.block_lora_.default, (x, A, B, ids, 1.5, base, backend.name))
    centers = torch.randn(4, 8)
    db = (centers, torch.full((4,), 0.5), torch.arange(5), centers.clone(), torch.tensor([3, -1, 0, 2]))
    torch.library.opcheck(torch.ops.melo_fast.vecdb_search.default, (centers + 0.01, *db, backend.name))


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_gradients_through_the_custom_op_equal_the_torch_backend(name):
    _available(name)
    grads = {}
    for backend in (name, "torch"):
        x, A, B, ids, base = _lora_inputs(requires_grad=True)
        out = ops.block_lora(x, A, B, ids, 1.5, base, backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads[backend] = [out.detach()] + [t.grad for t in (x, A, B, base)]
    for got, expected in zip(grads[name], grads["torch"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
