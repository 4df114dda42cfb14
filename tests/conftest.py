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

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # a checkout named differently: look beside the repository root
    SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZERS = SHARED / "assets" / "tokenizers"
ZSRE_DEV = SHARED / "data" / "zsre_knowedit_dev.json"

# Under CI (CI=true, as .ci/run exports) the compiled backends a user may lack are required:
# tests/test_optional_backends.py then fails instead of skipping when one cannot be used.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
