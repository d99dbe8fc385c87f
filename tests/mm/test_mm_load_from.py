"""``load_from`` a DyRepHook checkpoint (fine-tuning) versus ``resume``, through mmengine's own Runner.

A short RetinaNet run (DyRep on backbone, neck and head, a step every iteration) grows two blocks and saves
its checkpoint. A new run with ``load_from=<it>`` and ``resume=False`` starts from the grown structure and
its weights, with DyRep's schedule from the start (no counters, history or saliency carried over); with
``resume=True`` the schedule goes on.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.mm_data import find_hook, make_recorder, optimizer_params
from helpers.mm_production import det_cfg, train_runner
from mmengine.hooks import Hook

from dyrep_fx import api
from dyrep_fx.mm.checkpoint import load_mmengine_checkpoint

pytestmark = pytest.mark.slow

GROW_ITERS, GROW_INTERVAL = 2, 1  # the first run: two growth steps
INTERVAL = 2  # the second runs: a step every 2 iterations


class ControllerProbe(Hook):
    """The DyRep controller's counters and the model's blocks as training starts (after the checkpoint load)."""

    def before_train(self, runner) -> None:
        ctl = find_hook(runner, "DyRepHook").controller
        self.units, self.steps, self.history = ctl.units, ctl.steps_done, list(ctl.history)
        self.births, self.watched, self.candidates = dict(ctl.births), list(ctl.saliency.names), ctl.candidates()
        self.blocks = set(api.blocks(runner.model))
        optimizer = optimizer_params(runner.optim_wrapper.optimizer)
        self.outside_optimizer = [n for n, p in runner.model.named_parameters()
                                  if p.requires_grad and id(p) not in optimizer]


def run_from(root: Path, work_dir: Path, iters: int, checkpoint: Path, resume: bool):
    cfg = det_cfg(root, work_dir, iters, INTERVAL)
    cfg.load_from, cfg.resume = str(checkpoint), resume
    probe, recorder = ControllerProbe(), make_recorder()
    runner = train_runner(cfg, (probe, "LOWEST"), (recorder, "LOWEST"))
    return SimpleNamespace(runner=runner, probe=probe, recorder=recorder,
                           ctl=find_hook(runner, "DyRepHook").controller)


@pytest.fixture(scope="module")
def grown(deepforest_root, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("grown")
    train_runner(det_cfg(deepforest_root, work_dir, GROW_ITERS, GROW_INTERVAL))
    path = work_dir / f"iter_{GROW_ITERS}.pth"
    checkpoint = load_mmengine_checkpoint(str(path))
    state = checkpoint["dyrep_fx"]
    assert state["units"] == GROW_ITERS and len([e for e in state["history"] if e["grown"]]) == GROW_ITERS
    return SimpleNamespace(path=path, checkpoint=checkpoint, root=deepforest_root)


def test_load_from_restores_the_structure_and_weights_and_restarts_the_schedule(grown, tmp_path):
    run = run_from(grown.root, tmp_path / "finetune", INTERVAL, grown.path, resume=False)
    probe, saved = run.probe, grown.checkpoint
    # the grown structure is there, with the checkpoint's weights, every Parameter in the optimizer
    grown_sites = {f"{prefix}.{name}" for prefix, spec in saved["dyrep_fx"]["structures"].items()
                   for name in spec["sites"]}
    assert grown_sites and {n for n in probe.blocks if ".branches." not in n} == grown_sites
    start = run.recorder.before_train_state
    assert set(start) == set(saved["state_dict"])
    for key, value in saved["state_dict"].items():
        assert torch.equal(start[key], value), key
    assert probe.outside_optimizer == []
    # DyRep's schedule starts over: nothing carried over from the checkpoint's run
    assert (probe.units, probe.steps, probe.history, probe.births) == (0, 0, [], {})
    assert probe.watched == probe.candidates  # this run's candidates, not the checkpoint's watched set
    # its first step came after `interval` units
    assert run.ctl.units == INTERVAL and [e["unit"] for e in run.ctl.history] == [INTERVAL]
    final = load_mmengine_checkpoint(str(Path(run.runner.work_dir) / f"iter_{INTERVAL}.pth"))["dyrep_fx"]
    assert final["units"] == INTERVAL and len(final["history"]) == 1


def test_resume_goes_on_with_the_schedule(grown, tmp_path):
    iters = GROW_ITERS + INTERVAL
    run = run_from(grown.root, tmp_path / "resumed", iters, grown.path, resume=True)
    probe, saved = run.probe, grown.checkpoint["dyrep_fx"]
    assert probe.units == GROW_ITERS and probe.history == saved["history"]
    assert run.runner.iter == iters and run.ctl.units == iters
    assert [e["unit"] for e in run.ctl.history] == [1, 2, 4]
