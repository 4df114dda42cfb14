"""How the Triton backend loads and launches: no triton import by the package, the error without CUDA or
interpreter, the device of each launch, the work per launch, and the compiled variants warm-up covers.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); every program instance then costs milliseconds, so the CPU shapes stay
small (a few dozen programs per launch) while still crossing tile boundaries. Helpers: tests/ops_triton_helpers.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import tests.ops_triton_helpers  # noqa: F401  (skips this module without a usable Triton)
from melo_fast import ops  # noqa: E402
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
from melo_fast.ops.triton.vecdb_search import scan_config  # noqa: E402
from tests.ops_triton_helpers import (  # noqa: E402
    _run_python,
    lora_with_grads,
    make_db,
    make_lora,
    make_queries,
    rel_close,
    search,
)


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
