"""DyRep under DistributedDataParallel: 2 processes on gloo (CPU), launched with torchrun; on a GPU
machine also over nccl (one rank per GPU, up to 2; ``make test-cuda``).

The ranks see different data and use different seeds (torch and DyRep) for branch initialisation;
the test checks that every rank ends with the same structure and bitwise the same parameters, that
training goes on after each DDP rebuild, and that the per-iteration path does no Python collective.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.devices import gpu_count, needs_cuda
from helpers.launch import free_port

from dyrep_fx.saliency import random_scores

WORKER = Path(__file__).parent / "scripts" / "ddp_worker.py"
ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def launch(out: Path, mode: str, metric: str = "snip", backend: str = "gloo", world: int = WORLD) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), "--out", str(out),
           "--mode", mode, "--metric", metric, "--backend", backend]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module", params=["online", "dbb"])
def ranks(request, tmp_path_factory):
    return request.param, launch(tmp_path_factory.mktemp(f"ddp_{request.param}"), request.param)


@pytest.mark.slow
def test_same_structure_and_parameters_on_every_rank(ranks):
    mode, (r0, r1) = ranks
    assert r0["rank"] == 0 and r1["rank"] == 1
    assert r0["structure"] == r1["structure"]
    assert r0["structure"]["mode"] == mode and r0["structure"]["sites"]
    assert r0["history"] == r1["history"]
    assert list(r0["params"]) == list(r1["params"])
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert r0["optimizer_sizes"] == r1["optimizer_sizes"]
    assert sum(r0["optimizer_sizes"]) == len(r0["params"])


@pytest.mark.slow
def test_growth_and_cut_happened_and_training_went_on(ranks):
    mode, (r0, r1) = ranks
    steps = r0["steps"]
    assert len(steps) == 5 and all(s["grown"] for s in steps)
    assert any(".branches." in name for s in steps for name in s["grown"])  # nested growth too
    assert any(s["cut"] for s in steps)
    for r in (r0, r1):
        # 5 units of 2 iterations, then 3 more after the last rebuild: all finite
        assert len(r["losses"]) == 13 and all(math.isfinite(v) for v in r["losses"])
    assert r0["losses"] != r1["losses"]  # the ranks really trained on different data


@pytest.mark.slow
def test_new_branches_are_identical_on_every_rank_before_the_rebuild(ranks):
    """Growth decisions and new branch values agree without relying on DDP's constructor broadcast."""
    mode, (r0, r1) = ranks
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        assert s0["grown"] == s1["grown"] and s0["cut"] == s1["cut"]
        assert s0["grown_state_same"] and s1["grown_state_same"], s0["unit"]


@pytest.mark.slow
def test_parameters_identical_on_every_rank_right_after_each_step(ranks):
    """Cuts too: every rank must absorb the same values, before ``rewrap_ddp`` re-broadcasts rank 0's."""
    mode, (r0, r1) = ranks
    for s in r0["steps"]:
        assert s["params_same"], (s["unit"], s["grown"], s["cut"])


@pytest.mark.slow
def test_collectives_once_per_step_and_none_per_iteration(ranks):
    mode, (r0, r1) = ranks
    for r in (r0, r1):
        counts = r["counts"]
        assert "train" not in counts and "train_after" not in counts, counts
        for s in r["steps"]:
            c = counts[f"step{s['unit']}"]
            # one all_reduce for the interval's saliency; in dbb mode two per calibrated BatchNorm
            assert c.get("all_reduce", 0) == 1 + (2 * s["new_bns"] if mode == "dbb" else 0), (s, c)
            assert c.get("all_gather_object", 0) == 1  # the growth decision is checked once


@pytest.mark.slow
def test_random_metric_draws_the_same_sites_on_every_rank(tmp_path):
    """Ranks use different DyRep seeds (0 and 1); the random scores are rank 0's draws everywhere."""
    r0, r1 = launch(tmp_path, "online", metric="random")
    assert r0["history"] == r1["history"]
    assert [s["grown"] for s in r0["steps"]] == [s["grown"] for s in r1["steps"]]
    for event in r0["history"]:
        values = sorted(v for _, v in event["scores"])
        assert event["candidates"] == len(values) and all(0.0 <= v < 1.0 for v in values)
        names = [n for n, _ in event["scores"]]
        # The multiset of draws does not depend on the names' order: rank 0's seed, this step's draw.
        assert values == sorted(random_scores(names, seed=0, step=event["step"] - 1).values())
        assert values != sorted(random_scores(names, seed=1, step=event["step"] - 1).values())
        if event["grown"]:
            assert list(event["grown"]) == [event["scores"][0][0]]


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_nccl_ranks_on_gpus_grow_cut_and_agree(tmp_path, mode):
    """The gloo run above over nccl, one rank per GPU (2, or 1 on a single-GPU machine: then the CUDA
    DDP path, the rebuilds and the collectives still run, and the cross-rank checks are trivially true)."""
    world = min(2, gpu_count())
    results = launch(tmp_path, mode, backend="nccl", world=world)
    r0 = results[0]
    assert r0["structure"]["mode"] == mode and r0["structure"]["sites"]
    steps = r0["steps"]
    assert len(steps) == 5 and all(s["grown"] for s in steps) and any(s["cut"] for s in steps)
    for r in results:
        assert r["structure"] == r0["structure"] and r["history"] == r0["history"]
        assert all(s["params_same"] and s["grown_state_same"] for s in r["steps"])
        for name, value in r0["params"].items():
            assert torch.equal(r["params"][name], value), name
        assert len(r["losses"]) == 13 and all(math.isfinite(v) for v in r["losses"])
        assert "train" not in r["counts"] and "train_after" not in r["counts"], r["counts"]
