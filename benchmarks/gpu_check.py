"""One prepared GPU check of the Triton kernels: correctness, compiled variants, op speed, end to end.

    PYTHONPATH=. python benchmarks/gpu_check.py --budget-s 420 --out DIR    # on a CUDA machine
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run --out DIR         # anywhere: CPU, Triton interpreter
    PYTHONPATH=. python benchmarks/gpu_check.py --list                      # the checks, in run order
    PYTHONPATH=. python benchmarks/gpu_check.py --only lookup_fp32,e2e ...  # some of them

Everything runs from the source tree with the machine's torch, triton and transformers: no network,
no C++ build. On CUDA, within ``--budget-s`` seconds:

- correctness: the compiled kernels against the reference where no unit test reaches (offsets past
  2³¹ elements, the training shape against fp64, in place at scale, ties across scan splits at 1M
  centers), the Triton and ops unit tests (``pytest``), ``compute-sanitizer`` on small cases, and no
  kernel compiled while serving after ``melo_fast.ops.warmup``;
- compile: every production kernel variant compiled for sm_90 on the CPU, with ptxas's resource
  report (no register spills), and the spills the driver reports for what the run compiled;
- targets: the rows of the GPU-run issue's target table, timed side by side with
  ``triton.testing.do_bench`` (median; L2 flushed before every call), each figure next to its
  target and marked met / not met from the data;
- end to end: a GPT-2-medium-shaped model in bf16 with 10k edits, every sample hitting one.

The checks live in ``benchmarks/gpu_stages/``, one module per stage (environment, correctness, targets,
end_to_end, tooling, compilation; context and report hold what they share); this file runs them in the
order of ``STAGES``.

It writes ``gpu_check.json`` (device, versions, every figure) and ``gpu_check.md`` to ``--out`` and
prints the tables last. Exit status: 0 when every check ran and passed, 1 when one failed or broke,
2 when none failed but some did not run (budget, ``--only``). Performance targets are findings,
not checks: met or not, they do not change the status.

``--dry-run`` runs the same code with tiny shapes in the Triton interpreter (CPU); its timings are
CPU figures of tiny problems, so its target verdicts read "dry run". ``tests/test_gpu_check.py``
runs it in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_stages import compilation, correctness, end_to_end, environment, targets, tooling  # noqa: E402
from benchmarks.gpu_stages.context import SIZES, Ctx, Row, stage_checks, versions  # noqa: E402
from benchmarks.gpu_stages.report import exit_status, markdown  # noqa: E402

# Run order. The environment first: it measures the copy bandwidth that floors fall back on. The unit
# tests and the sanitizer after the targets: they take longest, so a short budget cuts them first. The
# compile checks last: the compile report runs in the background meanwhile, and the driver's spill
# report sees every variant the other checks compiled.
STAGES = (environment, correctness, targets, end_to_end, tooling, compilation)
CHECKS = [item for stage in STAGES for item in stage_checks(stage)]


def run(args) -> int:
    ctx = Ctx(args.dry_run, args.budget_s)
    torch = ctx.torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selected = [c for c in CHECKS if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in CHECKS}
    if unknown:
        raise SystemExit(f"gpu_check: unknown check(s) {sorted(unknown)}; --list shows the names")
    if any(c.name == "compile" for c in selected):
        compilation.start_compile_report(ctx, out)  # CPU-only: runs beside the GPU checks
    rows: list[Row] = []
    for item in selected:
        if ctx.remaining() < (item.cost_s if not ctx.dry else 0):
            rows.append(
                Row(
                    item.name,
                    item.section,
                    item.doc.split("\n")[0],
                    verdict="not run",
                    note=f"budget: {ctx.remaining():.0f} s left, needs ~{item.cost_s:.0f} s",
                )
            )
            print(f"[gpu_check] {item.name}: not run (budget)", flush=True)
            continue
        start = time.monotonic()
        try:
            new_rows = item.fn(ctx)
        except Exception as err:  # noqa: BLE001 - one broken check must not hide the others
            new_rows = [
                Row(
                    item.name,
                    item.section,
                    item.doc.split("\n")[0],
                    verdict="ERROR",
                    note=f"{type(err).__name__}: {err}"[:500],
                    data=dict(traceback=traceback.format_exc()),
                )
            ]
        for row in new_rows:
            row.data.setdefault("seconds", round(time.monotonic() - start, 2))
        rows += new_rows
        print(
            f"[gpu_check] {item.name}: {', '.join(r.verdict or 'info' for r in new_rows)} "
            f"({time.monotonic() - start:.1f} s)",
            flush=True,
        )
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    for process in ctx.background.values():  # a check that was not run leaves its process behind
        if process.poll() is None:
            process.kill()
    status = exit_status(rows, selected_all=len(selected) == len(CHECKS))
    report = dict(
        device=torch.cuda.get_device_name() if ctx.device.type == "cuda" else f"CPU ({platform.machine()})",
        dry_run=ctx.dry,
        budget_s=args.budget_s,
        elapsed_s=time.monotonic() - ctx.start,
        versions=versions(),
        exit_status=status,
        rows=[dataclasses.asdict(row) for row in rows],
    )
    table = markdown(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(table)
    print("\n" + table, flush=True)
    return status


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget in seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument(
        "--only",
        type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
        help="comma-separated check names (see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list the checks in run order and exit")
    parser.add_argument("--compile-report", metavar="JSON", help=argparse.SUPPRESS)  # internal: the compile subprocess
    parser.add_argument("--sanitizer-cases", action="store_true", help=argparse.SUPPRESS)  # internal
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for item in CHECKS:
            print(f"{item.name:28s} {item.section:12s} {item.doc.splitlines()[0]}")
        return 0
    if args.dry_run and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    if args.compile_report:
        compilation.compile_report_main(SIZES["dry" if args.dry_run else "gpu"]["compile"], args.compile_report)
        return 0
    if args.sanitizer_cases:
        tooling.sanitizer_cases_main(args.dry_run)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
