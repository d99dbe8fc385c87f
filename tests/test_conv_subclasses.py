"""``nn.Conv2d`` subclasses: grown only where the block reproduces their function exactly.

A block computes its conv itself and never calls the wrapped module's ``forward``. So:

* a subclass that changes what ``forward`` computes (weight standardisation, with or without a learned
  gain) is refused, with a reason naming its class, and a refused ``grow`` leaves the model untouched;
* a subclass that only adds attributes, buffers, parameters or methods grows and folds exactly, back to
  its own class, with its extra state kept;
* a subclass that pads to TensorFlow "same" from the input size at every call (a registered class of
  the test's own, and mmcv's ``Conv2dAdaptivePadding``) grows and folds exactly on every input size;
* a growth that fails midway leaves every module, parameter and buffer as it was.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import randomise, randomise_bns, rel_err
from torch import nn

import dyrep_fx
from dyrep_fx import conv_classes
from dyrep_fx.block import RepConv2d
from dyrep_fx.kinds import BranchKind
from dyrep_fx.passes import PassError

pytestmark = pytest.mark.usefixtures("one_thread")

F64_TOL = 1e-10
#: Input sizes, small and odd ones included: with stride 2 a TF "same" conv pads differently for each.
SIZES = [(5, 5), (7, 9), (1, 1), (8, 8), (6, 11)]
MODES = [("online", True), ("dbb", False)]  # dbb mode: bias-free convs, each feeding a BatchNorm


# ---------------------------------------------------------------------------------- the subclasses
def _standardise(weight: torch.Tensor, eps: float) -> torch.Tensor:
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    std = torch.sqrt(weight.var(dim=(1, 2, 3), keepdim=True) + eps)
    return (weight - mean) / std


class WSConv2d(nn.Conv2d):
    """Weight standardisation in forward (as in BiT / NFNet-style models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, _standardise(self.weight, 1e-5), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class GainWSConv2d(nn.Conv2d):
    """Weight standardisation with a learned gain per output channel and an ``eps`` attribute."""

    def __init__(self, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.eps = eps

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, self.gain * _standardise(weight, self.eps), bias)


class AnnotatedConv(nn.Conv2d):
    """Only adds things (a class attribute, an ``__init__`` keyword, attributes, buffers, an unused
    parameter, a method); forward is ``nn.Conv2d``'s."""

    tag = "user"

    def __init__(self, *args, note: str = "annotated", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.note = note
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def describe(self) -> str:
        return f"{self.note}:{self.tag}"


class TFSameConv(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size at every call (timm's ``Conv2dSame``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for i in (1, 0):  # F.pad takes the last axis first
            size, k, s, d = x.shape[-2 + i], self.kernel_size[i], self.stride[i], self.dilation[i]
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


conv_classes.register_conv_class(TFSameConv, conv_classes.SAME_FROM_INPUT)


class ReTFSameConv(TFSameConv):
    """Overrides the registered forward again: no longer the registered function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class ReConvForward(nn.Conv2d):
    """Overrides only ``_conv_forward`` (which ``nn.Conv2d.forward`` calls)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, weight.flip(-1), bias)


def adaptive_padding_class() -> type[nn.Conv2d]:
    """mmcv's ``Conv2dAdaptivePadding``, or skip."""
    module = pytest.importorskip("mmcv.cnn.bricks.conv2d_adaptive_padding")
    return module.Conv2dAdaptivePadding


class Net(nn.Module):
    """Two convs of one class, each feeding a BatchNorm: a stride-2 one (with ``stride``, ``kernel`` and
    ``dilation``) and a stride-1 3x3 one, where the identity branch applies."""

    def __init__(self, cls: type[nn.Conv2d], bias: bool, stride=2, kernel=3, dilation=1) -> None:
        super().__init__()
        self.conv = cls(3, 6, kernel, stride=stride, padding=1, dilation=dilation, bias=bias)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = cls(6, 6, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def build(cls: type[nn.Conv2d], bias: bool, seed: int = 0, **geometry) -> Net:
    torch.manual_seed(seed)
    model = Net(cls, bias, **geometry).double().eval()
    randomise_bns(model, seed)
    return model


def inputs(sizes=SIZES, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


# ------------------------------------------------------------------------------------------ helpers
def snapshot(model: nn.Module) -> dict:
    """Which module is where, which Parameter/buffer object is where, and every value."""
    return {
        "modules": {n: id(m) for n, m in model.named_modules(remove_duplicate=False)},
        "params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: (id(b), b.clone()) for n, b in model.named_buffers(remove_duplicate=False)},
        "keys": list(model.state_dict()),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["keys"] == before["keys"]
    for kind in ("params", "buffers"):
        assert list(after[kind]) == list(before[kind]), kind
        for name, (ident, value) in before[kind].items():
            assert after[kind][name][0] == ident, f"{kind} {name} was replaced"
            assert torch.equal(after[kind][name][1], value), f"{kind} {name} changed value"


def outputs(model: nn.Module, xs: list[torch.Tensor], train: bool = False) -> list[torch.Tensor]:
    """The model's outputs; in train mode on a copy, so that BatchNorm statistics stay as they are."""
    m = copy.deepcopy(model).train() if train else model.eval()
    with torch.no_grad():
        return [m(x) for x in xs]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for (h, w), a, b in zip(SIZES, got, want):
        err = rel_err(a, b)
        assert err <= F64_TOL, f"{what}, input {h}x{w}: relative error {err:.2e}"


def grow_fold_exact(cls: type[nn.Conv2d], mode: str, bias: bool, **geometry) -> nn.Module:
    """Grow every site with every kind, check the function at growth (eval; online also train mode),
    randomise, check the fold and a strict load into a fresh model. Returns the folded model."""
    model = build(cls, bias, **geometry)
    xs = inputs()
    want_eval = outputs(model, xs)
    want_train = outputs(model, xs, train=True)
    dyrep_fx.transform(model, mode=mode)
    assert all(s.eligible for s in dyrep_fx.sites(model)), [s.reason for s in dyrep_fx.sites(model)]
    report = dyrep_fx.grow(model)
    assert set(report.changed) == {"conv", "conv2"}
    assert "identity" in model.conv2.kinds
    assert_close(outputs(model, xs), want_eval, f"{mode}: eval mode after growth")
    if mode == "online":
        assert_close(outputs(model, xs, train=True), want_train, f"{mode}: train mode after growth")
    randomise(model, seed=3)
    grown = outputs(model, xs)
    if mode == "online":  # both execution plans of the 1x1_kxk branch
        for plan in ("assemble", "convs"):
            for block in dyrep_fx.blocks(model).values():
                block.execution = plan
            assert_close(outputs(model, xs), grown, f"online, plan {plan!r}")
    deploy = dyrep_fx.fold(model)
    assert type(deploy.conv) is cls and type(deploy.conv2) is cls
    assert_close(outputs(deploy, xs), grown, f"{mode}: folded")
    fresh = Net(cls, bias, **geometry).double().eval()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    assert_close(outputs(fresh, xs), grown, f"{mode}: fresh model loaded with the folded state_dict")
    return deploy


# ------------------------------------------------------------------------------------------- refused
@pytest.mark.parametrize("cls", [WSConv2d, GainWSConv2d])
@pytest.mark.parametrize("mode, bias", MODES)
def test_weight_standardised_conv_is_refused_and_left_untouched(cls, mode, bias):
    model = build(cls, bias)
    x = inputs()[0]
    want = outputs(model, [x])[0]
    dyrep_fx.transform(model, mode=mode)
    found = {s.name: s for s in dyrep_fx.sites(model)}
    for name in ("conv", "conv2"):
        assert not found[name].eligible and found[name].kinds == []
        assert found[name].reason.startswith(f"{cls.__name__} overrides ")
        assert "not a plain convolution of its weight" in found[name].reason
    before = snapshot(model)
    with pytest.raises(PassError, match=f"'conv' cannot grow: {cls.__name__} overrides"):
        dyrep_fx.grow(model, ["conv"])
    assert_untouched(model, before)
    assert not dyrep_fx.grow(model).changed  # every eligible site: there is none
    assert_untouched(model, before)
    assert torch.equal(outputs(model, [x])[0], want)
    with pytest.raises(TypeError, match=cls.__name__):
        RepConv2d(model.conv)
    # Nor is BatchNorm fused into it: the fused kernel would be standardised again.
    report = dyrep_fx.fuse_bn(model)
    assert not report.changed and cls.__name__ in report.skipped["conv"]
    assert_untouched(model, before)


@pytest.mark.parametrize("cls, method", [(ReTFSameConv, "forward"), (ReConvForward, "_conv_forward")])
def test_overriding_forward_again_or_conv_forward_is_refused(cls, method):
    model = build(cls, bias=True)
    dyrep_fx.transform(model)
    site = {s.name: s for s in dyrep_fx.sites(model)}["conv"]
    assert not site.eligible and site.reason.startswith(f"{cls.__name__} overrides {method}")


def test_forward_set_on_the_instance_is_refused():
    model = build(nn.Conv2d, bias=True)
    model.conv.forward = lambda x: nn.Conv2d.forward(model.conv, x) * 2
    dyrep_fx.transform(model)
    found = {s.name: s for s in dyrep_fx.sites(model)}
    assert not found["conv"].eligible and "forward set on the instance" in found["conv"].reason
    assert found["conv2"].eligible


def test_same_from_input_class_with_padding_is_refused():
    model = build(TFSameConv, bias=True)
    model.conv.padding = (1, 1)
    dyrep_fx.transform(model)
    site = {s.name: s for s in dyrep_fx.sites(model)}["conv"]
    assert not site.eligible and "TFSameConv pads to TensorFlow 'same'" in site.reason


def test_restore_refuses_a_structure_on_a_refused_class():
    grown = build(nn.Conv2d, bias=True)
    dyrep_fx.transform(grown)
    dyrep_fx.grow(grown, ["conv"], ["1x1"])
    spec = dyrep_fx.structure(grown)
    target = build(WSConv2d, bias=True)
    before = snapshot(target)
    with pytest.raises(PassError, match="WSConv2d overrides forward"):
        dyrep_fx.restore(target, spec)
    assert_untouched(target, before)


# ---------------------------------------------------------------------------------------------- grow
@pytest.mark.parametrize("mode, bias", MODES)
def test_attribute_only_subclass_grows_and_folds_exactly(mode, bias):
    model = build(AnnotatedConv, bias)
    with torch.no_grad():  # extra state away from its initial values, so that a fold must carry it
        model.conv.seen.fill_(3.0)
        model.conv.scratch.fill_(-1.0)
        model.conv.temperature.fill_(0.5)
    keys = list(model.state_dict())
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["conv"], ["1x1"])
    block = model.conv
    assert isinstance(block, RepConv2d)
    if mode == "online":  # dbb adds a main BatchNorm; online growth keeps the conv's own keys
        assert [k for k in model.state_dict() if not k.startswith("conv.branches.") and k != "conv.main_scale"] \
            == keys
    assert block.seen.item() == 3.0 and block.temperature.item() == 0.5
    assert "conv.scratch" not in model.state_dict()  # non-persistent, as on the conv

    deploy = grow_fold_exact(AnnotatedConv, mode, bias)
    assert deploy.conv.describe() == "annotated:user" and deploy.conv.tag == "user"
    assert list(deploy.state_dict()) == list(Net(AnnotatedConv, bias).state_dict())
    # Extra state folds back with its current values, into modules of their own.
    folded = dyrep_fx.fold(model)
    assert folded.conv.seen.item() == 3.0 and folded.conv.temperature.item() == 0.5
    assert torch.equal(folded.conv.scratch, torch.full((2,), -1.0))
    assert folded.conv.temperature is not model.conv.temperature and folded.conv.seen is not model.conv.seen


@pytest.mark.parametrize("mode, bias", MODES)
@pytest.mark.parametrize("geometry", [{}, {"stride": 1}, {"kernel": (3, 5), "stride": (2, 3), "dilation": (2, 1)}],
                         ids=["k3s2", "k3s1", "k3x5s2x3d2x1"])
def test_same_padding_from_input_size_grows_and_folds_exactly(mode, bias, geometry):
    deploy = grow_fold_exact(TFSameConv, mode, bias, **geometry)
    assert deploy.conv.padding == (0, 0)


@pytest.mark.parametrize("mode, bias", MODES)
def test_mmcv_adaptive_padding_grows_and_folds_exactly(mode, bias):
    cls = adaptive_padding_class()
    grow_fold_exact(cls, mode, bias)
    grow_fold_exact(cls, mode, bias, kernel=(3, 5), stride=(2, 3), dilation=(2, 1))


def test_mmcv_conv_classes():
    """mmcv's ``Conv`` wrapper (a forward that defers to nn.Conv2d's) grows; its weight-standardised
    ``ConvWS`` / ``ConvAWS`` are refused; ``build_conv_layer``'s default is a plain nn.Conv2d."""
    cnn = pytest.importorskip("mmcv.cnn")
    assert conv_classes.padding_rule(type(cnn.build_conv_layer(None, 3, 6, 3))) == conv_classes.STATIC
    assert conv_classes.padding_rule(cnn.Conv2d) == conv_classes.STATIC
    assert conv_classes.padding_rule(adaptive_padding_class()) == conv_classes.SAME_FROM_INPUT
    for name in ("ConvWS2d", "ConvAWS2d"):
        conv = getattr(cnn, name)(3, 6, 3)
        assert conv_classes.padding_rule(type(conv)) is None
        assert conv_classes.why_not_exact(conv).startswith(f"{name} overrides forward")
    for mode, bias in MODES:
        grow_fold_exact(cnn.Conv2d, mode, bias)


# --------------------------------------------------------------------------------- failed growth
@pytest.mark.parametrize("mode, bias", MODES)
def test_growth_failing_midway_leaves_the_model_untouched(mode, bias, monkeypatch):
    """The third site raises while growing, after two sites changed (a conv became a block, an existing
    block grew more branches): every module, parameter and buffer is put back as it was."""

    class Three(Net):
        def __init__(self) -> None:
            super().__init__(AnnotatedConv, bias)
            self.conv3 = nn.Conv2d(6, 6, 3, padding=1, bias=bias)
            self.bn3 = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn3(self.conv3(super().forward(x)))

    torch.manual_seed(0)
    model = Three().double().eval()
    randomise_bns(model)
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["conv2"], ["1x1"])
    randomise(model, seed=5)
    xs = inputs()
    want = outputs(model, xs)
    before = snapshot(model)

    real = BranchKind.make
    calls = []

    def failing(kind, *args, **kwargs):
        calls.append(kind.name)
        if len(calls) == 5:  # conv: 1x1_avg, kx1; conv2: 1x1_avg, kx1; conv3: 1x1_avg -> fails
            raise RuntimeError("injected failure")
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(BranchKind, "make", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        dyrep_fx.grow(model, ["conv", "conv2", "conv3"], ["1x1_avg", "kx1"])
    assert len(calls) == 5
    assert_untouched(model, before)
    assert isinstance(model.conv2, RepConv2d) and model.conv2.kinds == ["1x1"]
    assert type(model.conv) is AnnotatedConv and type(model.conv3) is nn.Conv2d
    assert_close(outputs(model, xs), want, f"{mode}: after the failed growth")
    monkeypatch.undo()
    dyrep_fx.grow(model, ["conv", "conv3"], ["1x1"])  # and it can still grow
    assert_close(outputs(model, xs), want, f"{mode}: grown after the failed growth")


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_mmdet_efficientnet_grows_and_folds_exactly(mode):
    """mmdet's EfficientNet builds its convs as ``Conv2dAdaptivePadding`` (49 of 81 in b0): every conv
    grows, exactly on odd input sizes, and the folded weights load strictly into a fresh backbone.
    Float64 rounding over 81 folded convs stays near 1e-10, so the bound is test_mm_backbones' 1e-9."""
    tol = 1e-9
    backbones = pytest.importorskip("mmdet.models.backbones")

    def make() -> nn.Module:
        torch.manual_seed(0)
        model = backbones.EfficientNet(arch="b0", out_indices=(4, 6)).double()
        randomise_bns(model)
        model.eval()  # this backbone's train() returns None: no chaining
        return model

    model = make()
    assert sum(type(m) is adaptive_padding_class() for m in model.modules()) == 49
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(1, 3, h, w, generator=g, dtype=torch.float64) for h, w in [(33, 35), (17, 16)]]
    with torch.no_grad():
        want = [model(x) for x in xs]
    dyrep_fx.transform(model, (xs[0],), mode=mode)
    assert all(s.eligible for s in dyrep_fx.sites(model))
    assert len(dyrep_fx.grow(model).changed) == 81
    model.eval()
    with torch.no_grad():
        for x, ref in zip(xs, want):
            assert max(rel_err(p, q) for p, q in zip(model(x), ref)) <= tol
    randomise(model, seed=4)
    with torch.no_grad():
        got = [model(x) for x in xs]
    fresh = make()
    fresh.load_state_dict(dyrep_fx.fold(model).state_dict(), strict=True)
    with torch.no_grad():
        for x, ref in zip(xs, got):
            assert max(rel_err(p, q) for p, q in zip(fresh(x), ref)) <= tol
