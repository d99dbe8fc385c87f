"""Process-wide settings for the test suite."""

from __future__ import annotations

import os

import pytest
import torch

# No global TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: torch >= 2.6 loads with weights_only=True, and mmengine 0.10.7's
# own checkpoints need unpickling; DyRepHook (trust_checkpoint) and `dyrep-fx fold` scope that switch to
# their own loads, and the tests check that they do.

# Keep the CPU tests at 2 threads (the CI machine has 2 cores) unless the caller chose a thread count.
if not any(v in os.environ for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one torch thread (tiny or float64 models), restoring the setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
