"""Shared test set-up.

Without CUDA, Triton kernels can only run in the interpreter, and TRITON_INTERPRET must be set
before triton is first imported; so it is set here, before any test module imports melo_fast.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The project's shared folder lies beside the checkout (../shared); MELO_FAST_SHARED names another place
# (benchmarks/gpu_check.py's device run carries the tokenizers to a machine that has no ../shared).
SHARED = Path(os.environ.get("MELO_FAST_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
TOKENIZERS = SHARED / "assets" / "tokenizers"
ZSRE_DEV = SHARED / "data" / "zsre_knowedit_dev.json"

# Under CI (CI=true, as .ci/run exports) the compiled backends a user may lack are required:
# tests/test_optional_backends.py then fails instead of skipping when one cannot be used.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
