"""Running selected tests on CUDA: the ``cuda`` marker, which skips without a GPU.

``make test-cuda`` (``pytest -m cuda``) runs exactly the tests marked here: the CUDA variants of the
``device``-parametrised tests (tests/conftest.py) and the CUDA-only ones (float16 AMP with a
GradScaler, DDP over nccl).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

#: The marks of a test (or a parameter) that needs a CUDA GPU.
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


def needs_cuda(test):
    """Mark ``test`` as a CUDA test: selected by ``-m cuda``, skipped without a GPU."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def gpu_count() -> int:
    """Visible CUDA devices (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full float32 convolutions and matmuls on CUDA within the block: cuDNN would otherwise use TF32
    (a 10-bit mantissa) on Ampere and later, far above the suite's float32 tolerances (1e-5)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
