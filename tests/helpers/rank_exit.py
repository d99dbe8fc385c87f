"""The start and end of one rank of a test worker launched with torchrun (gloo, CPU).

A gloo rank can abort at exit with "terminate called without an active exception" (SIGABRT) after it did all
its work and wrote its result (seen once in CI, in tests/scripts/ddp_grad_layout_worker.py; not reproduced in
60 local runs): gloo's C++ threads and objects that hold Python tensors (a DDP reducer freed late through a
reference cycle) are torn down during interpreter finalization, after the interpreter stopped being whole.
What the tests check is the result each rank writes, not how CPython finalizes a third-party library, so a
rank ends while everything is still alive, and a native abort before that prints every thread's stack.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def start_rank() -> None:
    """Print every thread's Python stack to stderr on a fatal signal (an abort names where it happened)."""
    faulthandler.enable(all_threads=True)


def end_rank() -> NoReturn:
    """Free what is left of DDP, wait for every rank, destroy the process group, and exit 0 without
    interpreter finalization. Call it after the rank wrote its result."""
    gc.collect()  # reducers (which hold the group) freed now, not during finalization
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
