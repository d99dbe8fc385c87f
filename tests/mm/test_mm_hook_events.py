"""DyRepHook's README claims about its events, on the toy classifier of tests/helpers/mm_toy.py (a real
Runner built from a config, seconds per run):

* ``by_epoch=True``: one controller step every ``interval`` epochs, counted in epochs, taken at the end of an
  epoch (``after_train_epoch``), never mid-epoch;
* ``calibrate_before_val``: during validation the training BatchNorms hold plain averages over that many
  training batches, and their running statistics after it (off with 0, and skipped beside an ``EMAHook``);
* mmengine's ``EMAHook`` through a cut: the EMA copy loses the same branches as the live model, absorbing its
  own averaged values, so its function is unchanged by the cut; its folded deploy file is exactly the fold
  of the EMA model.
"""

from __future__ import annotations

import pytest
import torch
from helpers.mm_data import find_hook, load_deploy, tensor_outputs
from helpers.mm_toy import ToyClassifier, toy_cfg, toy_val_entries, train_toy
from mmengine.hooks import Hook

from dyrep_fx import api
from dyrep_fx.mm.fold_checkpoint import fold_targets
from dyrep_fx.mm.inputs import side_loader

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def kinds_of(model) -> dict[str, list[str]]:
    """``{block: its branch kinds}`` of a model."""
    return {name: list(block.kinds) for name, block in api.blocks(model).items()}


# -- by_epoch ------------------------------------------------------------------------------------------------
#: 16 images in batches of 4: 4 iterations per epoch; 4 epochs with a DyRep step every 2.
EPOCH_ITERS, EPOCHS, EPOCH_INTERVAL = 4, 4, 2


class UnitProbe(Hook):
    """Per training iteration: the epoch, and the controller's unit count and blocks as the iteration starts."""

    def __init__(self) -> None:
        self.iters: list[dict] = []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        ctl = find_hook(runner, "DyRepHook").controller
        self.iters.append({"epoch": runner.epoch, "units": ctl.units, "blocks": len(api.blocks(ctl.model))})


def test_by_epoch_steps_every_interval_epochs_at_the_end_of_an_epoch(tmp_path):
    cfg = toy_cfg(tmp_path, 0, EPOCH_INTERVAL, hook_options=dict(by_epoch=True),
                  train_cfg=dict(by_epoch=True, max_epochs=EPOCHS, val_interval=EPOCHS + 1))
    cfg.train_dataloader.dataset.length = 4 * EPOCH_ITERS
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=EPOCHS)
    probe = UnitProbe()
    runner = train_toy(cfg, (probe, "LOWEST"))
    ctl = find_hook(runner, "DyRepHook").controller
    # units are epochs: 4 of them, not 16 iterations; a step after epochs 2 and 4
    assert ctl.units == EPOCHS and runner.iter == EPOCHS * EPOCH_ITERS
    assert [e["unit"] for e in ctl.history] == [2, 4] and all(e["grown"] for e in ctl.history)
    # every iteration of an epoch starts with the units of the epochs before it: no unit counted mid-epoch
    assert [it["units"] for it in probe.iters] == [i // EPOCH_ITERS for i in range(EPOCHS * EPOCH_ITERS)]
    # the first growth is in place from the first iteration of epoch 3 on, and not before
    blocks = [it["blocks"] for it in probe.iters]
    grown_from = blocks.index(next(b for b in blocks if b > blocks[0]))
    assert grown_from == EPOCH_INTERVAL * EPOCH_ITERS and probe.iters[grown_from]["epoch"] == EPOCH_INTERVAL


# -- EMAHook through a cut -----------------------------------------------------------------------------------
EMA_ITERS, EMA_INTERVAL = 6, 2
#: EMAHook's momentum: large, so the EMA weights are far from the live ones when the cut comes.
EMA_MOMENTUM = 0.5
#: The EMA model's outputs across a step (growth or cut), float32: |after - before| <= TOL * max|before|.
#: A cut absorbs the branch exactly (to rounding, ~1e-7 here); a cut that dropped a branch without absorbing
#: it moves the outputs by about its share of the kernel (~1e-2).
FUNCTION_TOL = 1e-5


class EmaProbe(Hook):
    """Around each due DyRep step (``"before"`` at HIGH runs before DyRepHook, ``"after"`` at priority 45
    between DyRepHook (40) and EMAHook (50), so the EMA has not averaged in between): the EMA model's and
    the live model's blocks and outputs on one fixed batch."""

    def __init__(self, record: dict[str, list], phase: str) -> None:
        self.record, self.phase = record, phase
        record.setdefault("before", [])
        record.setdefault("after", [])

    def before_train(self, runner) -> None:
        self.batch = next(iter(side_loader(runner.train_dataloader, seed=1)))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        ctl = find_hook(runner, "DyRepHook").controller
        if self.phase == "before" and not ctl.is_due():
            return
        if self.phase == "after" and len(self.record["after"]) == len(self.record["before"]):
            return
        ema = find_hook(runner, "EMAHook").ema_model.module
        self.record[self.phase].append({
            "ema_kinds": kinds_of(ema), "live_kinds": kinds_of(ctl.model),
            "ema_out": tensor_outputs(ema, self.batch)[0], "live_out": tensor_outputs(ctl.model, self.batch)[0]})


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("toy_ema")
    # std_gate 0: Dep cuts the branches below their block's mean importance as soon as they differ at all
    cfg = toy_cfg(work_dir, EMA_ITERS, EMA_INTERVAL, hook_options=dict(std_gate=0.0, deploy=True))
    cfg.custom_hooks.append(dict(type="EMAHook", momentum=EMA_MOMENTUM))
    record: dict[str, list] = {}
    runner = train_toy(cfg, (EmaProbe(record, "before"), "HIGH"), (EmaProbe(record, "after"), 45))
    return runner, record, work_dir


def test_ema_copy_takes_a_cut_with_its_own_values_and_keeps_its_function(ema_run):
    runner, record, _ = ema_run
    ctl = find_hook(runner, "DyRepHook").controller
    cuts = [i for i, e in enumerate(ctl.history) if e["cut"]]
    assert cuts, ctl.history  # the run did cut
    assert len(record["before"]) == len(record["after"]) == len(ctl.history) == EMA_ITERS // EMA_INTERVAL
    for i in cuts:
        before, after = record["before"][i], record["after"][i]
        # the cut reached the EMA copy: the same blocks with the same branches left as in the live model
        assert after["ema_kinds"] == after["live_kinds"] != before["live_kinds"]
        for name, kinds in ctl.history[i]["cut"].items():
            assert not set(kinds) & set(after["ema_kinds"].get(name, []))
        # the EMA model's own function is kept (its weights are not the live ones: it did not take theirs)
        ref = before["ema_out"]
        assert (after["ema_out"] - ref).abs().max() <= FUNCTION_TOL * ref.abs().max()
        assert (before["live_out"] - ref).abs().max() > 100 * FUNCTION_TOL * ref.abs().max()


def test_ema_deploy_file_is_the_fold_of_the_ema_model(ema_run):
    runner, _, work_dir = ema_run
    ema = find_hook(runner, "EMAHook").ema_model.module
    deploy = load_deploy(work_dir / "ema_dyrep_deploy.pth")
    folded = fold_targets(ema, ["backbone"]).state_dict()
    assert list(deploy) == list(folded)
    assert all(torch.equal(deploy[k], folded[k]) for k in deploy)
    # and loaded into the plain model it computes what the grown (and cut) EMA model computes
    plain = ToyClassifier()
    plain.load_state_dict(deploy, strict=True)
    batch = next(iter(side_loader(runner.train_dataloader, seed=2)))
    (got,), (ref,) = tensor_outputs(plain, batch), tensor_outputs(ema, batch)
    assert (got - ref).abs().max() <= FUNCTION_TOL * ref.abs().max()


# -- calibrate_before_val ------------------------------------------------------------------------------------
#: 8 iterations of batch 4 on the toy's 32 images; a step (online growth) every 4, validation at the end.
VAL_ITERS, VAL_INTERVAL = 8, 4


class StatsProbe(Hook):
    """The first BatchNorm's running mean at ``before_val_epoch`` (at HIGHEST: before DyRepHook; at LOWEST:
    after it) and the model's mode then, and the mean after validation (at LOWEST: after DyRepHook's
    ``after_val_epoch``)."""

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []
        self.training: list[bool] = []
        self.restored: list[torch.Tensor] = []

    def before_val_epoch(self, runner) -> None:
        self.means.append(runner.model.backbone[1].running_mean.clone())
        self.training.append(runner.model.training)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.restored.append(runner.model.backbone[1].running_mean.clone())


def calibration_run(tmp_path, hook_options: dict, ema: bool = False):
    cfg = toy_cfg(tmp_path, VAL_ITERS, VAL_INTERVAL, hook_options=hook_options,
                  train_cfg=dict(by_epoch=False, max_iters=VAL_ITERS, val_interval=VAL_ITERS), **toy_val_entries())
    if ema:
        cfg.custom_hooks.append(dict(type="EMAHook", momentum=0.5))
    before, after = StatsProbe(), StatsProbe()
    runner = train_toy(cfg, (before, "HIGHEST"), (after, "LOWEST"))
    return runner, before, after


def test_calibrate_before_val_sets_plain_averages_over_the_training_batches(tmp_path):
    # 8 batches of 4 from the side loader: one pass over the 32 training images, so the first BatchNorm's mean
    # is the mean of the first conv's output over the whole training set
    runner, before, after = calibration_run(tmp_path, dict(calibrate_before_val=8))
    assert len(after.means) == 1 and before.training == after.training == [True]
    model = find_hook(runner, "DyRepHook").controller.model
    assert api.blocks(model)  # the run grew (online), so the first conv may be a block: read its output
    dataset = runner.train_dataloader.dataset
    images = torch.stack([dataset[i]["inputs"] for i in range(len(dataset))])
    with torch.no_grad():
        expected = model.backbone[0](images).mean((0, 2, 3))
    torch.testing.assert_close(after.means[0], expected, rtol=1e-5, atol=1e-6)
    assert (before.means[0] - expected).abs().max() > 1e-3  # the running average had not got there
    # after validation the running statistics are back, value for value
    assert torch.equal(after.restored[0], before.means[0])


@pytest.mark.parametrize("case", ["off", "ema"])
def test_calibrate_before_val_leaves_statistics_when_off_or_beside_ema(tmp_path, case):
    options = dict(calibrate_before_val=0 if case == "off" else 8)
    _, before, after = calibration_run(tmp_path, options, ema=case == "ema")
    assert len(before.means) == 1 and torch.equal(before.means[0], after.means[0])


def test_calibrate_before_val_refuses_a_negative_count():
    from dyrep_fx.mm import DyRepHook

    with pytest.raises(ValueError, match="calibrate_before_val must be >= 0"):
        DyRepHook(calibrate_before_val=-1)
