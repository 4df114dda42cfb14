"""What the kernels compile to on a GPU target, found without a GPU.

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


def describe(launch: Launch) -> str:
    """A short readable name of the variant: kernel, tensor dtypes, constexprs, warps."""
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in launch.args if isinstance(a, torch.Tensor)})
    options = ", ".join(f"{k}={v}" for k, v in sorted(launch.kwargs.items()) if k != "UPCAST_DOT")
    return f"{launch.name.lstrip('_')}[{'/'.join(dtypes)}]({options})"
