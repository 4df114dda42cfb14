"""`python -m melo_fast env` tells which backends work here."""

import subprocess
import sys
from pathlib import Path


def test_env_lists_every_backend():
    done = subprocess.run([sys.executable, "-m", "melo_fast", "env"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    for backend in ("reference", "torch", "cpp", "triton"):
        assert f"backend {backend}" in done.stdout
    assert "backend torch     available" in done.stdout
