"""Shared set-up of the pytest-benchmark suites: one timing helper that records where it ran.

Run: ``pytest -q benchmarks --benchmark-only`` (CPU entries always, GPU entries when CUDA is there).
Every entry records device, versions and shapes in ``extra_info``; groups put backends side by side.
"""

from __future__ import annotations

import pytest
import torch

try:
    from benchmarks._common import MEASURED_PATHS, ROOT, device_name
except ImportError:  # benchmarks/ itself on sys.path (rootdir-relative import mode)
    from _common import MEASURED_PATHS, ROOT, device_name


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Record the commit the numbers come from, and every uncommitted file that could change them;
    keep the JSON small enough to commit.

    (pytest-benchmark's own ``commit_info`` says only "dirty", for any change anywhere in the tree.)
    The per-round times (``stats.data``, thousands of numbers for microsecond cases) are kept only
    where the report reads them: rows with an interleaved baseline, whose ratio is per round.
    """
    from melo_fast.eval.report import git_state

    output_json["melo_fast_source"] = git_state(ROOT, MEASURED_PATHS)
    for result in output_json.get("benchmarks", []):
        if not (result.get("extra_info") or {}).get("paired"):
            result.get("stats", {}).pop("data", None)


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
            from melo_fast.ops import cpp

            benchmark.extra_info["isa"] = cpp.isa()
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
