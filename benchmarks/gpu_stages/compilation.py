"""What the kernels compile to: every production variant for sm_90, compiled on the CPU in the background
(ptxas's resource report; the serving sweep against the warm-up), and the spills the driver reports for what the
run compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .context import ROOT, SCRIPT, Ctx, Row, check, verdict


def compile_report_main(sizes: dict, out_path: str) -> None:
    """``--compile-report``: runs with TRITON_INTERPRET=0 (real @triton.jit kernels, compiled for sm_90
    on the CPU). Records the launches of ``warmup`` for the run's layer shapes and of a serving
    sweep, counts the variants the sweep needs beyond the warm-up (Triton's own binder), and
    compiles every warm-up variant, keeping ptxas's resource report."""
    import torch

    from melo_fast.ops.triton._launch import record_launches
    from melo_fast.ops.triton.warmup import warmup

    from . import compile_report

    cpu = torch.device("cpu")
    dtypes = [getattr(torch, name) for name in sizes["dtypes"]]
    with record_launches(execute=False, as_gpu=True) as warm:
        for dtype in dtypes:
            warmup(cpu, sizes["lora"], dtype=dtype)
            for key_dim in sizes["key_dims"]:
                warmup(cpu, (), key_dim=key_dim, key_dtype=dtype)
    small_lora, small_key = (64, 48, 4), 32
    with record_launches(execute=False, as_gpu=True) as warm_small:
        for dtype in dtypes:
            warmup(cpu, [small_lora], key_dim=small_key, dtype=dtype)
    with record_launches(execute=False, as_gpu=True) as serving:
        compile_report.serving_sweep(small_lora, small_key, dtypes, cpu)
    warm_keys = {compile_report.variant_key(launch) for launch in warm_small}
    extra = sorted(
        {compile_report.describe(launch) for launch in serving if compile_report.variant_key(launch) not in warm_keys}
    )
    variants = {}
    for launch in warm:
        key = launch.name if sizes.get("one_per_kernel") else compile_report.variant_key(launch)
        variants[key] = launch  # the last one: warm-up goes from small tiles to large
    reports = []
    for launch in variants.values():
        _, resources = compile_report.compile_launch(launch)
        reports.append(dict(variant=compile_report.describe(launch), **resources))
    import triton

    result = dict(
        triton=triton.__version__,
        variants=reports,
        serving_launches=len(serving),
        warm_variants=len(warm_keys),
        not_warmed=extra,
    )
    Path(out_path).write_text(json.dumps(result, indent=1))


def _compile_report_path(ctx: Ctx, out: Path) -> Path:
    return out / "compile_report.json"


def start_compile_report(ctx: Ctx, out: Path) -> None:
    """Start the CPU-only compile report in a subprocess now; :func:`check_compile` collects it."""
    path = _compile_report_path(ctx, out)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, str(SCRIPT), "--compile-report", str(path)]
    if ctx.dry:
        command.append("--dry-run")
    log = open(out / "compile_report.log", "w")  # noqa: SIM115 - closed when the process is collected
    ctx.background["compile"] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    ctx.background["compile"].log = log


@check("compile", 2)  # only collects: the report was started in the background
def check_compile(ctx: Ctx) -> list[Row]:
    """Every warm-up variant of the run's layer shapes compiled for sm_90 (ptxas report: no spills);
    a serving sweep needs no variant beyond the warm-up (Triton's binder, sm_90 target)."""
    process = ctx.background.get("compile")
    if process is None:
        return [Row("compile", "compile", "compile report", verdict="not run", note="not started")]
    try:
        process.wait(timeout=max(ctx.remaining(), 1))
    except subprocess.TimeoutExpired:
        process.kill()
        return [Row("compile", "compile", "compile report", verdict="not run", note="budget ran out")]
    process.log.close()
    out = Path(process.log.name).parent
    if process.returncode != 0:
        tail = (out / "compile_report.log").read_text()[-1500:]
        return [Row("compile", "compile", "compile report", verdict="ERROR", note=tail.replace("\n", " ⏎ "))]
    report = json.loads(_compile_report_path(ctx, out).read_text())
    variants = report["variants"]
    spilling = [v for v in variants if v["spill_store_bytes"] or v["spill_load_bytes"] or v["stack_frame_bytes"]]
    worst = max(variants, key=lambda v: v["registers"])
    ptxas = sorted({v["ptxas"] for v in variants})
    rows = [
        Row(
            "compile",
            "compile",
            f"{len(variants)} production variants for sm_90 (Triton {report['triton']}, "
            f"{', '.join(ptxas)}): bytes spilled",
            f"{len(spilling)} variants spill; max {worst['registers']} registers ({worst['variant']})",
            "0 spills",
            verdict(not spilling),
            "; ".join(f"{v['variant']}: {v['spill_store_bytes']} B" for v in spilling),
            data=report,
        ),
        Row(
            "compile",
            "compile",
            f"serving sweep ({report['serving_launches']} launches: growing bank and "
            f"database, decode, new batch sizes) vs warm-up ({report['warm_variants']} variants)",
            f"{len(report['not_warmed'])} variants not warmed up",
            "0",
            verdict(not report["not_warmed"]),
            "; ".join(report["not_warmed"][:5]),
        ),
    ]
    return rows


@check("compile", 2)
def check_runtime_spills(ctx: Ctx) -> list[Row]:
    """Registers and spills the driver reports for every kernel variant this run compiled (CUDA only;
    last, so that it sees every variant the other checks compiled)."""
    if ctx.device.type != "cuda":
        return [
            Row(
                "runtime_spills",
                "compile",
                "driver-reported spills of the variants compiled here",
                verdict="n/a",
                note="dry run: nothing compiled",
            )
        ]
    kernels = compiled_kernels()
    spilling = [(name, k.n_spills) for name, k in kernels if getattr(k, "n_spills", 0)]
    regs = max((getattr(k, "n_regs", 0) for _, k in kernels), default=0)
    return [
        Row(
            "runtime_spills",
            "compile",
            f"driver report of the {len(kernels)} variants compiled so far",
            f"{len(spilling)} spill; max {regs} registers",
            "0 spills",
            verdict(not spilling),
            "; ".join(f"{n}: {s}" for n, s in spilling),
        )
    ]


def _kernel_functions():
    from melo_fast.ops.triton import block_lora, vecdb_search

    return [
        getattr(m, n) for m in (block_lora, vecdb_search) for n in dir(m) if n.startswith("_") and n.endswith("_kernel")
    ]


def compiled_kernels() -> list[tuple[str, object]]:
    """(kernel name, compiled kernel) for every variant in Triton's in-memory caches (Triton 3.x)."""
    found = []
    for fn in _kernel_functions():
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            raise RuntimeError("this Triton keeps no device_caches on its kernels; cannot count compilations")
        for entry in caches.values():
            found += [(fn.fn.__name__, kernel) for kernel in entry[0].values()]
    return found
