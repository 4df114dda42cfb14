"""How every kernel of the Triton backend is launched: on its tensors' device, and observably.

- **Device.** Triton launches on the *current* CUDA device and its current stream, not on the
  device of the arguments. A model on ``cuda:1``, or spread over GPUs with ``device_map="auto"``,
  would otherwise run its kernels on ``cuda:0`` with pointers into another GPU's memory (an illegal
  access). :func:`launch` enters ``torch.cuda.device(device)`` around each launch.
- **Tile configuration.** :func:`gpu_tiles` says whether a launcher should pick the compiled
  kernels' tile sizes (CUDA) or the interpreter's (few large tiles: its cost is per operation).
- **fp64.** The kernels accumulate in fp32 at most (``tl.dot``), so fp64 inputs would silently lose
  precision; :func:`use_torch_for_fp64` hands them to the ``torch`` backend instead, with one log
  line per op and process.
- **Recording.** :func:`record_launches` lists every launch (kernel, grid, arguments) made inside
  it, optionally without running anything and with the GPU tile configuration on CPU tensors. The
  tests and ``benchmarks/gpu_check.py`` use it to see which kernel variants a call compiles, and
  to compile exactly those for a GPU target on a machine without one (``benchmarks/gpu_stages/compile_report.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field

import torch


@dataclass
class Launch:
    """One kernel launch: ``kernel[grid](*args, **kwargs)`` on ``device``."""

    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, num_stages)
    device: torch.device

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", None)
        return getattr(fn, "__name__", None) or getattr(self.kernel, "__name__", repr(self.kernel))

    @property
    def programs(self) -> int:
        count = 1
        for size in self.grid:
            count *= size
        return count


@dataclass
class _Recording:
    launches: list[Launch] = field(default_factory=list)
    execute: bool = True
    as_gpu: bool = False
    sm_count: int = 132


_thread = threading.local()  # this thread's recording, if any


def _recording() -> _Recording | None:
    return getattr(_thread, "recording", None)


@contextlib.contextmanager
def record_launches(execute: bool = True, as_gpu: bool = False, sm_count: int = 132):
    """Record the launches made in this thread inside the ``with`` block.

    Args:
        execute: also run them (False: only record; outputs stay uninitialized).
        as_gpu: launchers pick the compiled-GPU tile configuration even for CPU tensors (to see,
            or compile for a GPU target, what a GPU would run), as if the GPU had ``sm_count``
            multiprocessors (132: an H100/H200 SXM).

    Yields:
        The list of :class:`Launch`, filled as launches happen.
    """
    previous = _recording()
    recording = _Recording(execute=execute, as_gpu=as_gpu, sm_count=sm_count)
    _thread.recording = recording
    try:
        yield recording.launches
    finally:
        _thread.recording = previous


def interpreting(triton_module) -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``: on CPU tensors)."""
    knobs = getattr(triton_module, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def gpu_tiles(device: torch.device) -> bool:
    """Whether launches for ``device`` use the compiled-GPU tile configuration."""
    recording = _recording()
    return device.type == "cuda" or (recording is not None and recording.as_gpu)


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (what :func:`record_launches` pretends under ``as_gpu``)."""
    recording = _recording()
    if device.type != "cuda":
        return recording.sm_count if recording is not None else 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


_sm_counts: dict[int, int] = {}


def _cuda_sm_count(index: int) -> int:
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def device_guard(device: torch.device):
    """Context that makes ``device`` current for a CUDA launch (nothing to do for CPU tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``device`` current (see the module docstring)."""
    recording = _recording()
    with device_guard(device):
        if recording is not None:
            recording.launches.append(Launch(kernel, tuple(grid), args, kwargs, device))
            if not recording.execute:
                return
        kernel[grid](*args, **kwargs)


_fp64_logged: set[str] = set()


def use_torch_for_fp64(op: str, *tensors: torch.Tensor) -> bool:
    """Whether ``op`` should run on the torch backend because an input is fp64 (logged once per op)."""
    if not any(t.dtype == torch.float64 for t in tensors):
        return False
    if op not in _fp64_logged:
        _fp64_logged.add(op)
        logging.getLogger("melo_fast.ops.triton").warning(
            "melo_fast: the Triton %s kernels compute in fp32 at most; float64 inputs use the torch "
            "backend instead (full fp64 precision)",
            op,
        )
    return True
