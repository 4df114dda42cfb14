"""What the C++ CPU backend's tests (``tests/test_ops_cpp_*.py``) share: whether ``melo_fast._C`` loads here
(:data:`needs_ext` skips a test when it does not) and the 16-bit dtypes with their test ids."""

import pytest
import torch

from melo_fast.ops import cpp

try:
    cpp.load()
    _EXT_ERROR = None
except ImportError as err:  # not built here: only the fallback tests run
    _EXT_ERROR = str(err)

needs_ext = pytest.mark.skipif(_EXT_ERROR is not None, reason=f"cpp backend unavailable: {_EXT_ERROR}")
LOW = [torch.bfloat16, torch.float16]
DTYPE_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
