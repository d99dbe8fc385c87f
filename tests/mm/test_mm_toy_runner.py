"""Two DyRepHook settings in a real mmengine Runner on the toy classifier (tests/helpers/mm_toy.py):

* ``DyRepHook(recompute=True)`` (README): every block the run grows, nested ones included, recomputes its
  1x1 stages in backward, and training goes on with finite losses;
* ``load_from`` a folded ``dyrep_deploy.pth`` (DyRepHook's docstring): it loads as a plain checkpoint, the
  run starts from the plain architecture with the deploy weights, and DyRep's schedule starts over.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.mm_data import find_hook, load_deploy
from helpers.mm_toy import toy_cfg, train_toy
from mmengine.hooks import Hook

from dyrep_fx import api

ITERS = 4


class Probe(Hook):
    """Per iteration the loss; at the start of training the blocks and the backbone's weights."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.losses: list[float] = []

    def before_train(self, runner) -> None:
        self.blocks_at_start = dict(api.blocks(runner.model))
        self.start = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.losses.append(float(outputs["loss"].detach()))


def run(cfg) -> tuple:
    probe = Probe()
    runner = train_toy(cfg, (probe, probe.priority))
    return runner, probe, find_hook(runner, "DyRepHook").controller


@pytest.mark.slow
def test_recompute_reaches_every_block_grown_in_a_runner(tmp_path: Path):
    cfg = toy_cfg(tmp_path, ITERS, 1, hook_options=dict(mode="dbb", recompute=True, nested="open"))
    runner, probe, ctl = run(cfg)
    blocks = api.blocks(runner.model)
    assert len(ctl.history) == ITERS and any(".branches." in name for name in blocks)  # nested growth too
    assert blocks and all(block.mode == "dbb" and block.recompute for block in blocks.values()), \
        {name: block.recompute for name, block in blocks.items()}
    assert len(probe.losses) == ITERS and all(math.isfinite(v) for v in probe.losses)


@pytest.mark.slow
def test_load_from_a_folded_deploy_file_starts_from_the_plain_architecture(tmp_path: Path):
    first, _, first_ctl = run(toy_cfg(tmp_path / "first", 2, 1, hook_options=dict(deploy=True)))
    assert api.blocks(first.model) and first_ctl.history
    deploy_path = tmp_path / "first" / "dyrep_deploy.pth"
    deploy = load_deploy(deploy_path)
    assert not any(".branches." in key for key in deploy)

    cfg = toy_cfg(tmp_path / "second", ITERS, 2, load_from=str(deploy_path), resume=False)
    _, probe, ctl = run(cfg)
    assert probe.blocks_at_start == {}  # the plain architecture: nothing rebuilt from the deploy file
    assert list(probe.start) == list(deploy)
    for key, value in deploy.items():  # training started from the deploy weights
        assert torch.equal(probe.start[key], value), key
    assert [e["unit"] for e in ctl.history] == [2, 4]  # DyRep's schedule from the start
    assert all(math.isfinite(v) for v in probe.losses)
