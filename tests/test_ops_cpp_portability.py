"""The C++ CPU backend's (``cpp``, csrc/) portability and fallback: the package and the ops work without the
extension (these tests always run), and each CPU code path (ISA) matches the ``reference`` backend.
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
from tests.ops_cpp_helpers import _EXT_ERROR

ROOT = Path(__file__).resolve().parents[1]


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
