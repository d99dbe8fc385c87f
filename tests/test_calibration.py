"""dbb-mode calibration of a shared conv (a detection head's conv called once per pyramid level): the new
branches' BatchNorms end with the average of the per-call statistics over every call of every batch
(mm_configs/README.md: "calibration averages over calls"), computed here from the maps themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyrep_fx

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (12, 6, 3)  # three "pyramid levels" per forward, of different sizes (so different statistics)
CALIB_BATCHES = 3


class SharedHead(nn.Module):
    """One 3x3 conv (with bias, as a head's prediction conv) applied to every level, then a 1x1 classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
        self.cls = nn.Conv2d(4, 2, 1, dtype=torch.float64)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.cls(torch.relu(self.conv(x))) for x in levels]


def levels(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # each level its own mean and spread, so that averaging over calls differs from pooling all pixels
    return [torch.randn(2, 4, s, s, generator=g, dtype=torch.float64) * (1 + i) + i for i, s in enumerate(SIZES)]


def call_average(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over calls of each call's batch mean and unbiased batch variance, per channel."""
    means = torch.stack([m.mean((0, 2, 3)) for m in maps])
    variances = torch.stack([m.var((0, 2, 3), unbiased=True) for m in maps])
    return means.mean(0), variances.mean(0)


def test_new_branch_batchnorms_average_the_statistics_of_every_call():
    torch.manual_seed(0)
    model = SharedHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calib = [levels(100 + i) for i in range(CALIB_BATCHES)]
    ctl = dyrep_fx.DyRep(model, opt, interval=1, mode="dbb", kinds=["1x1", "identity"], calib_loader=calib,
                         calib_batches=CALIB_BATCHES, forward_fn=lambda m, batch: m(batch),
                         example_inputs=(levels(0),))
    assert next(s for s in ctl.sites() if s.name == "conv").calls == len(SIZES)
    loss = sum(out.square().mean() for out in model(levels(1)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    result = ctl.step()
    assert result.grown == {"conv": ["1x1", "identity"]} and result.calibrated_batches == CALIB_BATCHES

    block = model.conv
    inputs = [x for batch in calib for x in batch]  # every call: batches x levels
    identity, pointwise = block.branches["identity"], block.branches["1x1"]
    # what each branch's BatchNorm saw: the conv's input itself, and the 1x1 conv at the window's centre
    # (a 3x3 conv with padding 1: the centre tap reads the unpadded map)
    seen = {identity: inputs, pointwise: [F.conv2d(x, pointwise.conv.weight) for x in inputs]}
    for branch, maps in seen.items():
        mean, var = call_average(maps)
        torch.testing.assert_close(branch.bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(branch.bn.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(branch.bn.num_batches_tracked) == len(inputs)
        pooled = torch.cat([m.permute(1, 0, 2, 3).reshape(4, -1) for m in maps], 1).mean(1)
        assert (pooled - mean).abs().max() > 0.1  # the levels differ: pooling every pixel would not pass


# -- calibrate: every training BatchNorm, for evaluation ----------------------------------------------------
class TwoStage(nn.Module):
    """conv-BN-ReLU twice (float64), plus a third BatchNorm the tests freeze as ``norm_eval`` would."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
        self.frozen = nn.BatchNorm2d(4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def calibration_batches(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    # each batch its own offset, so a running average with momentum differs from the plain average
    return [torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + i for i in range(count)]


def trained_stage_model() -> TwoStage:
    torch.manual_seed(0)
    model = TwoStage()
    with torch.no_grad():  # statistics far from the data's, as after many lagging updates
        for bn in (model.bn1, model.bn2, model.frozen):
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(0.25)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.bn2.momentum = 0.3
    model.train()
    model.frozen.eval()
    return model


def test_calibrate_sets_plain_averages_of_training_mode_statistics():
    model = trained_stage_model()
    batches = calibration_batches(4)
    # expected, computed from the maps: BatchNorm 2 sees its input as training normalises it (BatchNorm 1
    # with batch statistics), not as eval mode would (with BatchNorm 1's stale running statistics)
    seen1, seen2 = [], []
    with torch.no_grad():
        for x in batches:
            h = model.conv1(x)
            seen1.append(h)
            mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
            normed = (h - mean) / torch.sqrt(var + model.bn1.eps) * model.bn1.weight.view(1, -1, 1, 1) \
                + model.bn1.bias.view(1, -1, 1, 1)
            seen2.append(model.conv2(torch.relu(normed)))
    frozen_stats = (model.frozen.running_mean.clone(), model.frozen.running_var.clone())

    used = dyrep_fx.calibrate(model, batches, num_batches=10, forward=lambda m, b: m(b))

    assert used == len(batches)
    for bn, maps in ((model.bn1, seen1), (model.bn2, seen2)):
        mean, var = call_average(maps)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
    # the frozen BatchNorm keeps its statistics; flags and momenta are as before
    assert torch.equal(model.frozen.running_mean, frozen_stats[0]) and float(model.frozen.running_var[0]) == 0.25
    assert model.training and model.bn1.training and not model.frozen.training
    assert (model.bn1.momentum, model.bn2.momentum) == (0.1, 0.3)


def test_calibrate_uses_at_most_num_batches():
    model = trained_stage_model()
    batches = calibration_batches(4)
    assert dyrep_fx.calibrate(model, batches, num_batches=2, forward=lambda m, b: m(b)) == 2
    with torch.no_grad():
        first_two = [model.conv1(x) for x in batches[:2]]
    torch.testing.assert_close(model.bn1.running_mean, call_average(first_two)[0], rtol=1e-10, atol=1e-12)


def test_calibrate_refuses_a_model_without_a_training_batchnorm():
    model = trained_stage_model().eval()
    with pytest.raises(ValueError, match="no BatchNorm of TwoStage is in training mode.*model.train"):
        dyrep_fx.calibrate(model, calibration_batches(1), forward=lambda m, b: m(b))


def test_calibrated_puts_the_running_statistics_back_even_after_an_error():
    model = trained_stage_model()
    batches = calibration_batches(4)
    with torch.no_grad():
        model(batches[0])  # one training update, so the count is not at its initial value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = trained_stage_model()
    with torch.no_grad():
        reference(batches[0])
    dyrep_fx.calibrate(reference, batches, forward=lambda m, b: m(b))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with dyrep_fx.calibrated(model, batches, forward=lambda m, b: m(b)) as used:
            assert used == len(batches)
            # inside: the calibrated statistics
            torch.testing.assert_close(model.bn2.running_var, reference.bn2.running_var, rtol=0, atol=0)
            assert int(model.bn1.num_batches_tracked) == len(batches)
            raise RuntimeError("evaluation failed")
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert int(after["bn1.num_batches_tracked"]) == 1
