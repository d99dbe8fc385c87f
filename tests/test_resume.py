"""Checkpoint and resume: a run interrupted halfway and resumed in a fresh process equals a straight run.

The training code is shared with the fresh process: tests/scripts/resume_worker.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.numerics import assert_same

WORKER = Path(__file__).parent / "scripts" / "resume_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("dyrep_resume_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


w = _load_worker()


@pytest.fixture(autouse=True)
def _deterministic():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    w.deterministic()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    torch.set_rng_state(rng)


def straight_run(mode: str, opt_name: str):
    model, opt, sched, ctl = w.build(mode, opt_name)
    losses = w.train_units(model, opt, sched, ctl, 0, w.UNITS)
    return w.checkpoint(model, opt, sched, ctl), losses


def first_half(mode: str, opt_name: str):
    model, opt, sched, ctl = w.build(mode, opt_name)
    w.train_units(model, opt, sched, ctl, 0, w.HALF)
    assert ctl.units == w.HALF
    assert ctl.saliency.count > 0  # saved in the middle of an interval: its saliency must travel too
    return w.checkpoint(model, opt, sched, ctl)


def grown_units(history, first: int, last: int) -> list[int]:
    return [e["unit"] for e in history if first <= e["unit"] <= last and e["grown"]]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "opt_name"), [("online", "sgd"), ("dbb", "adamw")])
def test_resume_in_a_fresh_process_equals_straight_run(tmp_path, mode, opt_name):
    straight, losses = straight_run(mode, opt_name)
    history = straight["dyrep"]["history"]
    assert grown_units(history, 1, w.HALF) and grown_units(history, w.HALF + 1, w.UNITS)
    assert any(e["cut"] for e in history if e["unit"] > w.HALF)

    half = tmp_path / "half.pt"
    torch.save(first_half(mode, opt_name), half)
    torch.load(half, weights_only=True)  # plain data: loads without unpickling any class

    out = tmp_path / "final.pt"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    proc = subprocess.run([sys.executable, str(WORKER), "--ckpt", str(half), "--out", str(out), "--mode", mode,
                           "--opt", opt_name], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = torch.load(out, weights_only=True)

    assert resumed["losses"] == losses[w.HALF * w.ITERS:]
    assert_same(resumed["dyrep"]["history"], history, "history")
    assert_same(resumed["model"], straight["model"], "model")
    assert_same(resumed["optimizer"], straight["optimizer"], "optimizer")
    assert_same(resumed["scheduler"], straight["scheduler"], "scheduler")
    assert_same(resumed["dyrep"], straight["dyrep"], "dyrep")


def test_resume_needs_the_rng_state_and_the_controller_state():
    """Controls for the test above: what breaks the equality when a piece is left out of the resume."""
    mode, opt_name = "online", "sgd"
    straight, _ = straight_run(mode, opt_name)
    ckpt = first_half(mode, opt_name)

    # everything restored, in this process: equal
    model, opt, sched, ctl = w.resume(ckpt, mode, opt_name)
    w.train_units(model, opt, sched, ctl, w.HALF, w.UNITS)
    assert_same(model.state_dict(), straight["model"], "model")

    # without the RNG state the dropout masks differ
    torch.manual_seed(999)
    model, opt, sched, ctl = w.build(mode, opt_name, seed=123)
    ctl.load_state_dict(ckpt["dyrep"])
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    w.train_units(model, opt, sched, ctl, w.HALF, w.UNITS)
    assert not torch.equal(model.conv1.weight, straight["model"]["conv1.weight"])

    # without the controller state the grown model's state_dict does not load
    model, opt, sched, ctl = w.build(mode, opt_name, seed=123)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(ckpt["model"])


def test_controller_state_loads_into_a_fresh_model_only():
    import dyrep_fx

    ckpt = first_half("online", "sgd")
    fresh_model, fresh_opt, _, fresh_ctl = w.build("online", "sgd", seed=5)
    fresh_ctl.load_state_dict(ckpt["dyrep"])
    assert fresh_ctl.units == w.HALF and fresh_ctl.history == ckpt["dyrep"]["history"]
    assert fresh_ctl.saliency.count == ckpt["dyrep"]["saliency"]["count"]
    # the optimizer holds exactly the grown model's parameters, in the saved order
    assert [len(g["params"]) for g in fresh_opt.param_groups] == \
           [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
    fresh_model.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["optimizer"])

    # a model grown differently is refused, and left as it was
    grown = {name for e in ckpt["dyrep"]["history"] for name in e["grown"]}
    other = next(s for s in ("conv1", "conv2", "conv3") if s not in grown)
    model, opt, _, ctl = w.build("online", "sgd")
    dyrep_fx.grow(model, [other])
    before = dyrep_fx.structure(model)
    with pytest.raises(ValueError, match="different grown structure"):
        ctl.load_state_dict(ckpt["dyrep"])
    assert dyrep_fx.structure(model) == before
