"""Shared set-up of the pytest-benchmark suites: one timing helper that records where it ran.

Run: ``pytest -q benchmarks --benchmark-only`` (CPU entries always, GPU entries when CUDA is there).
Every entry records device, versions and shapes in ``extra_info``; groups put backends side by side.
"""

from __future__ import annotations

import pytest
import torch

try:
    from benchmarks._common import device_name
except ImportError:  # benchmarks/ itself on sys.path (rootdir-relative import mode)
    from _common import device_name


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@pytest.fixture
def run_bench(benchmark):
    """run_bench(fn, group=, device=, backend=, rounds=None, setup=None, **extra) -> seconds (min).

    ``fn`` is timed with a CUDA synchronize inside. ``rounds`` (for the slow reference backend, or
    with ``setup`` for backward passes that need a fresh graph per round) switches to pedantic mode;
    otherwise pytest-benchmark calibrates the rounds itself.
    """

    def run(fn, *, group, device, backend, rounds=None, setup=None, warmup_rounds=1, **extra):
        sync = _sync(device)

        def timed(*args):
            result = fn(*args)
            sync()
            return result

        benchmark.group = group
        benchmark.extra_info.update(
            backend=backend,
            device=device_name(device),
            torch=torch.__version__,
            **{key: (str(value) if isinstance(value, torch.dtype) else value) for key, value in extra.items()},
        )
        if backend == "cpp":
            from melo_fast.ops import cpu

            benchmark.extra_info["isa"] = cpu.isa()
        if setup is not None or rounds is not None:
            pedantic_setup = None if setup is None else (lambda: (setup(), {}))
            benchmark.pedantic(
                timed, setup=pedantic_setup, rounds=rounds or 5, warmup_rounds=warmup_rounds, iterations=1
            )
        else:
            benchmark(timed)
        stats = getattr(benchmark, "stats", None)
        return stats.stats.min if stats else None

    return run
