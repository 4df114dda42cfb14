"""What the kernels compile to on a GPU target, found without a GPU (the GPU check's tooling, not runtime code).

Given launches recorded by :func:`melo_fast.ops.triton._launch.record_launches` (usually with
``execute=False, as_gpu=True`` on CPU tensors), this module:

- :func:`variant_key`: the key under which Triton's JIT caches the compiled kernel for that launch
  (argument types, integer and alignment specialization, constexprs, options), computed with
  Triton's own argument binder for the target. Launches with equal keys share one compilation:
  the number of distinct keys is the number of compilations a process pays.
- :func:`compile_launch`: compiles that launch for the target (default sm_90, an H100/H200) and
  reads the resource report (registers, spill bytes, stack frame) of the ``ptxas`` run Triton makes.

It uses Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``), present in
Triton 3.4–3.9; on another version the functions raise ``RuntimeError`` saying so. Kernels must be
real ``@triton.jit`` functions, i.e. the process must run with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import subprocess

import torch

from melo_fast.ops.triton._launch import Launch

H100_TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size


def _target(target):
    from triton.backends.compiler import GPUTarget

    return GPUTarget(*target) if isinstance(target, tuple) else target


def _binding(launch: Launch, target):
    """``(jit_fn, backend, bound_args, specialization, options)`` as Triton's JIT would compute them."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as err:
        raise RuntimeError(f"compile_report: this Triton lacks the internals it needs ({err})") from err
    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"compile_report: {launch.name} is not a compiled @triton.jit function "
            "(run with TRITON_INTERPRET=0 to compile for a GPU target)"
        )
    backend = make_backend(_target(target))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    return fn, backend, bound_args, specialization, options


def variant_key(launch: Launch, target=H100_TARGET) -> tuple:
    """Triton's JIT cache key of ``launch`` on ``target``: equal keys = one compilation."""
    _, _, _, specialization, options = _binding(launch, target)
    return (launch.name, tuple(map(str, specialization)), str(options))


def compile_launch(launch: Launch, target=H100_TARGET) -> tuple[object, dict]:
    """Compile ``launch``'s kernel variant for ``target`` (no GPU needed).

    Returns:
        Triton's compiled kernel and the resource report of the ``ptxas`` run that Triton itself made
        (same assembler, same flags): ``{"registers", "stack_frame_bytes", "spill_store_bytes",
        "spill_load_bytes", "ptxas"}``, the last being the assembler's version line.
    """
    import triton
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    fn, backend, bound_args, specialization, options = _binding(launch, target)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.kwargs), bound_args, specialization,
                                                          options)  # fmt: skip
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    # Triton prints its ptxas log when asked; always_compile makes sure ptxas runs (no cache hit).
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        kernel = triton.compile(source, target=_target(target), options=options.__dict__)
    report = {}
    for name, pattern in _RESOURCES.items():
        found = re.findall(pattern, log.getvalue())
        if not found:
            raise RuntimeError(f"compile_report: no {name!r} in the ptxas log of {launch.name}:\n{log.getvalue()}")
        report[name] = max(int(value) for value in found)
    report["ptxas"] = _ptxas_version(get_ptxas(_target(target).arch).path)
    return kernel, report


_RESOURCES = {
    "registers": r"Used (\d+) registers",
    "stack_frame_bytes": r"(\d+) bytes stack frame",
    "spill_store_bytes": r"(\d+) bytes spill stores",
    "spill_load_bytes": r"(\d+) bytes spill loads",
}


@functools.cache
def _ptxas_version(path: str) -> str:
    found = re.search(r"release ([\d.]+)", subprocess.run([path, "--version"], capture_output=True, text=True).stdout)
    return f"ptxas {found.group(1)}" if found else "ptxas (unknown version)"


def serving_sweep(lora_shape: tuple[int, int, int], key_dim: int, dtypes, device) -> int:
    """Make the calls a serving and editing process makes as its bank and database grow.

    Block LoRA (forward in place and out of place, backward) over growing banks (1 → 100 blocks),
    decode steps (T = 1) and prompts (T = 7 … 513), batches of 1 to 32 samples; lookups with 1 to 64
    queries against databases of 1 to 5000 keys. Every call uses the same layer shape
    ``(d_in, d_out, k)`` and key size, as one model would. Run it inside
    :func:`~melo_fast.ops.triton._launch.record_launches` to see the variants it needs (compare with
    :func:`melo_fast.ops.triton.warmup.warmup` for the same shapes), or on a GPU to count compilations.

    Returns:
        The number of calls made.
    """
    from melo_fast.ops.triton.block_lora import block_lora_bwd, block_lora_fwd
    from melo_fast.ops.triton.vecdb_search import vecdb_search_fwd

    d_in, d_out, k = lora_shape
    g = torch.Generator().manual_seed(0)
    calls = 0
    for dtype in dtypes:
        for n_blocks in (1, 2, 15, 16, 17, 100):
            A = torch.randn(n_blocks, k, d_in, generator=g).to(device, dtype)
            B = torch.randn(n_blocks, k, d_out, generator=g).to(device, dtype)
            for n, t in ((1, 1), (3, 1), (32, 1), (1, 7), (2, 16), (4, 17), (1, 64), (3, 100), (1, 513)):
                x = torch.randn(n, t, d_in, generator=g).to(device, dtype)
                base = torch.randn(n, t, d_out, generator=g).to(device, dtype)
                ids = torch.randint(-1, n_blocks, (n,), generator=g).to(device)
                block_lora_fwd(x, A, B, ids, 2.0, base, inplace=True)
                out, h = block_lora_fwd(x, A, B, ids, 2.0, base, store_h=True)
                block_lora_bwd(torch.randn_like(out), x, A, B, ids, 2.0, h)
                calls += 3
    for n_centers in (1, 2, 15, 16, 17, 1000, 5000):
        centers = torch.randn(n_centers, key_dim, generator=g).to(device)
        db = (torch.ones(n_centers, device=device), torch.arange(n_centers + 1, device=device), centers,
              torch.arange(n_centers, device=device))  # fmt: skip
        for n_queries in (1, 2, 16, 17, 32, 33, 64):
            vecdb_search_fwd(torch.randn(n_queries, key_dim, generator=g).to(device), centers, *db)
            calls += 1
    return calls


def describe(launch: Launch) -> str:
    """A short readable name of the variant: kernel, tensor dtypes, constexprs, warps."""
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in launch.args if isinstance(a, torch.Tensor)})
    options = ", ".join(f"{k}={v}" for k, v in sorted(launch.kwargs.items()) if k != "UPCAST_DOT")
    return f"{launch.name.lstrip('_')}[{'/'.join(dtypes)}]({options})"
