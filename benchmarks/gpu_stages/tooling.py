"""The unit tests and ``compute-sanitizer`` on this device. They run after the targets: they take longest, so
a short budget cuts them first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from .context import ROOT, SCRIPT, Ctx, Row, check, load_ops, singleton_db, verdict


@check("correctness", 150)
def check_unit_tests(ctx: Ctx) -> list[Row]:
    """The Triton and ops unit tests on this device (compiled kernels vs the reference, every dtype)."""
    files = [
        "tests/test_ops_triton_search.py",
        "tests/test_ops_triton_lora.py",
        "tests/test_ops_triton_launch.py",
        "tests/test_ops_triton_gpu.py",
        "tests/test_ops.py",
    ]
    args = ["-k", "test_search_empty_database"] if ctx.dry else []  # the dry run checks the plumbing
    timeout = max(ctx.remaining() - 70, 10)  # leave time for the sanitizer, the compile report and the report
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *args]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [
            Row(
                "unit_tests",
                "correctness",
                " ".join(files),
                verdict="not run",
                note=f"stopped after {timeout:.0f} s (budget)",
            )
        ]
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return [
        Row(
            "unit_tests",
            "correctness",
            " ".join(files) + (" (subset)" if ctx.dry else ""),
            summary,
            "all pass",
            verdict(done.returncode == 0),
            "; ".join(failures[:8]) or done.stderr[-500:],
            # The failures' tracebacks: a device run is short and costly, so keep what explains them.
            data=dict(output_tail=done.stdout[-6000:] if done.returncode else ""),
        )
    ]


@check("correctness", 50)
def check_sanitizer(ctx: Ctx) -> list[Row]:
    """``compute-sanitizer --tool memcheck`` on small search and block LoRA cases (where it works)."""
    tool = shutil.which("compute-sanitizer")
    cases = [sys.executable, str(SCRIPT), "--sanitizer-cases"] + (["--dry-run"] if ctx.dry else [])
    command = cases if tool is None else [tool, "--tool", "memcheck", "--error-exitcode", "99", *cases]
    timeout = max(min(ctx.remaining() - 15, 150), 5)
    # Without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end instead of landing in a cached neighbour.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [
            Row(
                "sanitizer",
                "correctness",
                "compute-sanitizer memcheck",
                verdict="not run",
                note=f"stopped after {timeout:.0f} s",
            )
        ]
    output = done.stdout + done.stderr
    if tool is None:
        return [
            Row(
                "sanitizer",
                "correctness",
                "compute-sanitizer memcheck",
                "cases ran without it: " + ("ok" if done.returncode == 0 else "FAILED"),
                "0 errors",
                "n/a" if done.returncode == 0 else "FAIL",
                "compute-sanitizer not installed",
                data=dict(output=output[-2000:]),
            )
        ]
    if "Device not supported" in output or "error 999" in output.lower():
        return [
            Row(
                "sanitizer",
                "correctness",
                "compute-sanitizer memcheck",
                verdict="n/a",
                note="the sanitizer does not support this machine (e.g. gVisor)",
                data=dict(output=output[-2000:]),
            )
        ]
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    errors = int(summary[-1]) if summary else -1
    return [
        Row(
            "sanitizer",
            "correctness",
            "compute-sanitizer memcheck, small cases (fp32, bf16)",
            f"{errors} errors" if errors >= 0 else "no summary",
            "0 errors",
            verdict(done.returncode == 0 and errors == 0),
            output[-300:].replace("\n", " ⏎ "),
            data=dict(output=output[-4000:]),
        )
    ]


def sanitizer_cases_main(dry: bool) -> None:
    """``--sanitizer-cases``: small search and block LoRA calls (forward, backward, in place)."""
    import torch

    ops = load_ops()
    device = torch.device("cpu" if dry else "cuda")
    g = torch.Generator(device=device).manual_seed(3)
    centers_n, queries_n, tokens = (30, 3, 5) if dry else (300, 20, 37)  # the interpreter is slow
    for dtype in (torch.float32, torch.bfloat16):
        centers = torch.randn(centers_n, 40, generator=g, device=device).to(dtype)
        queries = (centers[:queries_n].float() + 0.01).to(dtype)
        ids = ops.vecdb_search(queries, *singleton_db(centers, 3.0), backend="triton")
        assert torch.equal(ids.cpu(), torch.arange(queries_n)), ids
        x = torch.randn(5, tokens, 40, generator=g, device=device).to(dtype).requires_grad_()
        A = torch.randn(3, 4, 40, generator=g, device=device).to(dtype).requires_grad_()
        B = torch.randn(3, 4, 72, generator=g, device=device).to(dtype).requires_grad_()
        block_ids = torch.tensor([2, -1, 0, 2, 1], device=device)
        base = torch.randn(5, tokens, 72, generator=g, device=device).to(dtype)
        out = ops.block_lora(x, A, B, block_ids, 2.0, base, backend="triton")
        out.backward(torch.ones_like(out))
        with torch.no_grad():
            ops.block_lora(x, A, B, block_ids, 2.0, base.clone(), backend="triton", inplace=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("sanitizer cases done")
