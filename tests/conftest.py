"""Process-wide settings for the test suite."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.devices import CUDA_MARKS, no_tf32
from helpers.profiles import register_profiles

# No global TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: torch >= 2.6 loads with weights_only=True, and mmengine 0.10.7's
# own checkpoints need unpickling; DyRepHook (trust_checkpoint) and `dyrep-fx fold` scope that switch to
# their own loads, and the tests check that they do.

# Keep the CPU tests at 2 threads (the CI machine has 2 cores) unless the caller chose a thread count.
if not any(v in os.environ for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))


register_profiles()  # before any test module is imported: their @settings inherit the profile


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``cuda`` marker (``-m cuda``: only the CUDA tests, ``make test-cuda``)."""
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU; skipped without one (`make test-cuda`)")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA_MARKS)])
def device(request) -> torch.device:
    """The device a test runs on: cpu, and cuda where a GPU is present (marked ``cuda``, TF32 off for the
    module: see :func:`helpers.devices.no_tf32`). Module scope: hypothesis refuses function-scoped
    fixtures in property tests.
    """
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    with no_tf32():
        yield torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one torch thread (tiny or float64 models), restoring the setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def analyses(monkeypatch):
    """How many times the site analysis runs (``dyrep_fx.passes.analysis.analyse``, the real one, counted)."""
    from dyrep_fx.passes import analysis

    real, calls = analysis.analyse, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(analysis, "analyse", counted)
    return calls
