"""Process-wide settings for the test suite."""

from __future__ import annotations

import os

import pytest
import torch

# mmengine 0.10.7 calls torch.load() without weights_only, and torch >= 2.6 defaults to weights_only=True, so
# loading mmengine's own checkpoints (resume, load_from, load_checkpoint) fails on its pickled HistoryBuffer
# (upstream open-mmlab/mmengine#1655). torch reads this variable at every torch.load() call that passes no
# weights_only, so setting it here is early enough; loads that pass weights_only explicitly are not affected.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

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
