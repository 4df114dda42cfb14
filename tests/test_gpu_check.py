"""``benchmarks/gpu_check.py --dry-run``: the GPU check script runs end to end on the CPU.

The dry run takes the same code paths as the GPU run (Triton interpreter, tiny shapes), so a broken
script is found here, in CI, rather than in a short, costly session on a lent GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

# The rows of the GPU-run issue's target table, by check id (lookup_fp32 and lookup_bf16 come from one check).
TARGET_ROWS = {"lookup_fp32", "lookup_bf16", "lookup_vs_cdist", "addon", "decode", "fwd_bwd", "e2e"}
# Checks that are "n/a" on a CPU: no compiled kernels, no compute-sanitizer, no device caches.
CPU_NOT_APPLICABLE = {"runtime_spills", "no_compile_after_warmup", "sanitizer"}


@pytest.fixture
def script(monkeypatch):
    """The script as a module, for in-process runs (its dataclasses need it in sys.modules)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the dry run is the CPU stand-in; on a GPU run the script itself")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return done, out


def test_dry_run_passes_and_reports_every_target(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["exit_status"] == 0
    rows = report["rows"]
    targets = {row["check"] for row in rows if row["section"] == "target"}
    assert targets == TARGET_ROWS
    for row in rows:
        if row["section"] == "target":
            assert row["figure"] and row["target"] and row["verdict"] == "dry run", row
        elif row["section"] in ("correctness", "compile"):
            expected = "n/a" if row["check"] in CPU_NOT_APPLICABLE else "pass"
            assert row["verdict"] == expected, row
    compile_rows = [row for row in rows if row["check"] == "compile"]
    assert len(compile_rows) == 2 and compile_rows[0]["data"]["variants"], "sm_90 compile report expected"
    assert report["versions"]["torch"] == torch.__version__


def test_dry_run_writes_markdown_and_prints_it_last(dry_run):
    done, out = dry_run
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("DRY RUN") and "| target (GPU-run issue) |" in table
    assert done.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])


def test_a_failing_check_exits_nonzero(script, tmp_path, monkeypatch):
    """A wrong in-place kernel must turn the run red (exit status 1, verdict FAIL)."""
    from melo_fast.ops.triton import block_lora

    real_expand = block_lora._expand

    def wrong_in_place(h, bank, block_ids, base, out, scale, inplace):
        real_expand(h, bank, block_ids, base, out, scale * (1.5 if inplace else 1.0), inplace)

    monkeypatch.setattr(block_lora, "_expand", wrong_in_place)
    status = script.main(["--dry-run", "--only", "inplace_at_scale", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 1 and report["exit_status"] == 1
    assert [row["verdict"] for row in report["rows"]] == ["FAIL", "FAIL"]


def test_budget_exhausted_checks_are_not_run(script, tmp_path):
    status = script.main(["--dry-run", "--budget-s", "0", "--only", "big_lora,addon", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 2
    assert [row["verdict"] for row in report["rows"]] == ["not run", "not run"]


def test_unknown_check_name_is_refused(script, tmp_path):
    with pytest.raises(SystemExit, match="unknown check"):
        script.main(["--dry-run", "--only", "no_such_check", "--out", str(tmp_path)])


def test_tuning_sweep_dry_run_writes_every_sweep(tmp_path):
    """``benchmarks/gpu_tune.py --dry-run``: every sweep runs through the production launchers and checks its
    result against the torch backend (ids equal, small relative error), so the GPU call cannot break on plumbing."""
    if torch.cuda.is_available():
        pytest.skip("the dry run is the CPU stand-in")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_tune.py"), "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_tune.json").read_text())
    for row in report["lookup"]:
        assert row["ids_equal"] == row["of"] and not row["error"]
    for row in report["lora"] + report["dw"]:
        assert row["rel_l2"] < 1e-2 and not row["error"]
    assert set(report["host"]) and report["e2e_profile"]["patched"]["wall_ms_per_step"] > 0
