"""The public API (``dyrep_fx.transform/sites/grow/cut/fold/structure/restore/blocks``) on real models.

Everything runs in float64 with randomised BatchNorm statistics and affine parameters, so that a
wrong kernel, bias or statistic shows as a difference far above rounding (tolerance 1e-9 relative).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from helpers.numerics import randomise_bns, randomise_scales, rel_err
from torch import nn

import dyrep_fx
from dyrep_fx.passes.base import PassError
from dyrep_fx.tracing import TraceFailure

TOL = 1e-9


# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers --------------------------------------------------------------------------------------------






@torch.no_grad()
def run_eval(model: nn.Module, *inputs) -> torch.Tensor:
    model.eval()
    return model(*inputs)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    randomise_bns(model)
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was."""
    return {
        "class": type(model),
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "ids": [(n, id(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "dyrep": model.__dict__.get(dyrep_fx.api.STATE_ATTR),
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["class"] is snap["class"]
    assert now["types"] == snap["types"]
    assert now["ids"] == snap["ids"]
    assert now["params"] == snap["params"]
    assert now["training"] == snap["training"]
    assert now["dyrep"] is snap["dyrep"]
    assert list(now["state"]) == list(snap["state"])
    for key, value in snap["state"].items():
        assert torch.equal(now["state"][key], value), key


X = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


# -- models ---------------------------------------------------------------------------------------------
class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        if x.mean() > 0:
            return self.bn(self.conv(x))
        return x - self.bn(self.conv(x))


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.gate = Gate(8)
        self.head = ConvBN(8, 8)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)))


class Recorder(nn.Module):
    """A model with its own method and attributes, to check they survive."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBN(3, 8), ConvBN(8, 8))
        self.fc = nn.Linear(8, 4)
        self.tag = "keep-me"

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))

    def features(self, x):
        return self.body(x)


# -- the five-line usage --------------------------------------------------------------------------------
def test_five_line_usage_on_resnet18():
    model = resnet18()
    ref = run_eval(model, X)
    dyrep_fx.transform(model)
    dyrep_fx.grow(model)
    assert rel_err(run_eval(model, X), ref) <= TOL
    randomise_bns(model, seed=3)
    randomise_scales(model)
    grown = run_eval(model, X)
    deploy = dyrep_fx.fold(model)
    assert rel_err(run_eval(deploy, X), grown) <= TOL
    fresh = torchvision.models.resnet18(num_classes=10).double()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    assert rel_err(run_eval(fresh, X), grown) <= TOL
    assert len(dyrep_fx.blocks(model)) == 20 and not dyrep_fx.blocks(deploy)


# -- sites ----------------------------------------------------------------------------------------------
def test_sites_fields_and_shapes_with_example_inputs():
    model = resnet18()
    dyrep_fx.transform(model, example_inputs=(X,))
    found = {s.name: s for s in dyrep_fx.sites(model)}
    assert len(found) == 20 and all(s.eligible for s in found.values())
    stem = found["conv1"]
    assert (stem.module_type, stem.in_channels, stem.out_channels) == ("Conv2d", 3, 64)
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2) and stem.padding == (3, 3)
    assert stem.dilation == (1, 1) and stem.groups == 1 and stem.bias is False
    assert stem.calls == 1 and stem.next_bn == "bn1" and stem.depth == 0
    assert stem.input_shape == (2, 3, 32, 32) and stem.output_shape == (2, 64, 16, 16)
    assert stem.kinds == ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "prior"] and stem.grown == []
    down = found["layer2.0.downsample.0"]
    assert down.kinds == ["1x1_kxk"] and down.next_bn == "layer2.0.downsample.1"
    assert down.input_shape == (2, 64, 8, 8) and down.output_shape == (2, 128, 4, 4)
    assert "identity" in found["layer1.0.conv1"].kinds and "identity" not in found["layer2.0.conv1"].kinds
    json.dumps([s.as_dict() for s in found.values()])


def test_sites_without_example_inputs_have_no_shapes():
    model = resnet18()
    dyrep_fx.transform(model)
    site = dyrep_fx.sites(model)[0]
    assert site.calls == 1 and site.input_shape is None and site.output_shape is None


def test_sites_requires_transform():
    with pytest.raises(PassError, match="transform"):
        dyrep_fx.sites(resnet18())


# -- grow -----------------------------------------------------------------------------------------------
def test_grow_with_names_and_kinds():
    model = resnet18()
    ref = run_eval(model, X)
    dyrep_fx.transform(model)
    report = dyrep_fx.grow(model, ["layer1.0.conv1", "layer3.1.conv2"], ["1x1", "prior"])
    assert report.changed == {"layer1.0.conv1": ["1x1", "prior"], "layer3.1.conv2": ["1x1", "prior"]}
    assert report.describe("layer1.0.conv1") == "grew 1x1, prior"
    assert set(dyrep_fx.blocks(model)) == {"layer1.0.conv1", "layer3.1.conv2"}
    assert model.layer1[0].conv1.kinds == ["1x1", "prior"]
    site = next(s for s in dyrep_fx.sites(model) if s.name == "layer1.0.conv1")
    assert site.grown == ["1x1", "prior"] and "prior" not in site.kinds and "1x1_avg" in site.kinds
    assert rel_err(run_eval(model, X), ref) <= TOL
    # the rest of the kinds, by default
    report = dyrep_fx.grow(model, ["layer1.0.conv1"])
    assert model.layer1[0].conv1.kinds == ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity", "prior"]
    assert rel_err(run_eval(model, X), ref) <= TOL
    # nothing left to grow there: skipped with a reason
    report = dyrep_fx.grow(model, ["layer1.0.conv1"])
    assert not report.changed and "already present" in report.skipped["layer1.0.conv1"]


def test_grow_kind_that_does_not_apply_names_site_and_kind():
    model = resnet18()
    dyrep_fx.transform(model)
    snap = snapshot(model)
    with pytest.raises(PassError) as err:
        dyrep_fx.grow(model, ["layer1.0.conv1", "layer2.0.downsample.0"], ["1x1_kxk", "1xk"])
    assert "'1xk'" in str(err.value) and "'layer2.0.downsample.0'" in str(err.value)
    assert_unchanged(model, snap)
    with pytest.raises(PassError, match=r"'identity'.*'layer2\.0\.conv1'"):
        dyrep_fx.grow(model, ["layer2.0.conv1"], ["identity"])
    with pytest.raises(PassError, match="no conv site named 'nope'"):
        dyrep_fx.grow(model, ["nope"])
    with pytest.raises(ValueError, match=r"'3x3' is not a branch kind; the kinds are \['1x1', "):
        dyrep_fx.grow(model, ["conv1"], ["3x3"])
    dyrep_fx.grow(model, ["conv1"], ["1x1"])
    with pytest.raises(PassError, match="already has a '1x1' branch"):
        dyrep_fx.grow(model, ["conv1"], ["1x1"])
    assert list(dyrep_fx.blocks(model)) == ["conv1"] and model.conv1.kinds == ["1x1"]


def test_cut():
    model = resnet18()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, ["layer1.0.conv1", "layer2.0.conv2"])
    randomise_scales(model)
    ref = run_eval(model, X)
    report = dyrep_fx.cut(model, "layer1.0.conv1", ["1x1", "prior"])
    assert report.changed == {"layer1.0.conv1": ["1x1", "prior"]}
    assert "layer1.0.conv1: cut 1x1, prior" in str(report)
    assert model.layer1[0].conv1.kinds == ["1x1_kxk", "1x1_avg", "1xk", "kx1", "identity"]
    assert rel_err(run_eval(model, X), ref) <= TOL
    # cutting every branch leaves an un-grown block with the original keys
    dyrep_fx.cut(model, "layer2.0.conv2", model.layer2[0].conv2.kinds)
    assert not model.layer2[0].conv2.grown
    assert rel_err(run_eval(model, X), ref) <= TOL
    sd = model.state_dict()
    assert "layer2.0.conv2.weight" in sd and not any(k.startswith("layer2.0.conv2.") and k != "layer2.0.conv2.weight"
                                                     for k in sd)
    snap = snapshot(model)
    with pytest.raises(PassError, match=r"no \['1x1'\] branch"):
        dyrep_fx.cut(model, "layer1.0.conv1", ["1x1"])
    with pytest.raises(PassError, match="not a grown site"):
        dyrep_fx.cut(model, "layer3.0.conv1", ["1x1"])
    assert_unchanged(model, snap)


# -- structure and restore ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_structure_restore_roundtrip(mode):
    model = resnet18()
    dyrep_fx.transform(model, mode=mode)
    dyrep_fx.grow(model, ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer2.1.conv2"])
    dyrep_fx.grow(model, ["layer1.0.conv1.branches.1x1_kxk.conv2"], ["1x1", "1xk"])  # nested
    dyrep_fx.cut(model, "layer2.1.conv2", ["prior", "identity"])
    randomise_bns(model, seed=7)
    randomise_scales(model)
    ref = run_eval(model, X)
    spec = json.loads(json.dumps(dyrep_fx.structure(model)))
    assert spec["mode"] == mode and set(spec["sites"]) == {"conv1", "layer1.0.conv1", "layer2.0.downsample.0",
                                                           "layer2.1.conv2"}
    assert spec["sites"]["layer1.0.conv1"]["nested"]["branches.1x1_kxk.conv2"]["kinds"] == ["1x1", "1xk"]

    fresh = torchvision.models.resnet18(num_classes=10).double()
    dyrep_fx.restore(fresh, spec)
    assert type(fresh) is torchvision.models.ResNet
    assert list(fresh.state_dict()) == list(model.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert rel_err(run_eval(fresh, X), ref) <= TOL
    assert dyrep_fx.structure(fresh) == spec


def test_restore_refuses_bad_spec_and_leaves_model_unchanged():
    model = resnet18()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, ["layer1.0.conv1"])
    spec = dyrep_fx.structure(model)
    fresh = torchvision.models.resnet18(num_classes=10).double()
    dyrep_fx.transform(fresh)
    snap = snapshot(fresh)
    bad = copy.deepcopy(spec)
    bad["sites"]["layer9.conv"] = {"kinds": ["1x1"]}
    with pytest.raises(PassError, match="layer9.conv"):
        dyrep_fx.restore(fresh, bad)
    bad = copy.deepcopy(spec)
    bad["sites"]["layer2.0.conv1"] = {"kinds": ["identity"]}  # stride 2: no identity branch
    with pytest.raises(PassError, match="identity"):
        dyrep_fx.restore(fresh, bad)
    with pytest.raises(PassError, match="format"):
        dyrep_fx.restore(fresh, {"sites": {}})
    assert_unchanged(fresh, snap)


# -- untraceable parts ----------------------------------------------------------------------------------
def test_untraceable_submodule_becomes_leaf_and_its_convs_are_ineligible():
    torch.manual_seed(0)
    model = GatedNet().double()
    randomise_bns(model)
    ref = run_eval(model, X)
    dyrep_fx.transform(model)
    state = dyrep_fx.api.state_of(model)
    assert state.traced.root_traced and set(state.traced.untraceable) == {"gate"}
    found = {s.name: s for s in dyrep_fx.sites(model)}
    assert not found["gate.conv"].eligible
    assert "'gate'" in found["gate.conv"].reason and "could not trace" in found["gate.conv"].reason
    assert found["stem.0"].eligible and found["head.0"].eligible
    report = dyrep_fx.grow(model)
    assert set(report.changed) == {"stem.0", "head.0"}
    assert isinstance(model.gate.conv, nn.Conv2d) and not isinstance(model.gate.conv, dyrep_fx.RepConv2d)
    assert rel_err(run_eval(model, X), ref) <= TOL
    with pytest.raises(PassError, match="gate.conv.*could not trace"):
        dyrep_fx.grow(model, ["gate.conv"])


def test_model_without_conv_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    snap = snapshot(model)
    with pytest.raises(TraceFailure, match="holds no convolution"):
        dyrep_fx.transform(model)
    assert_unchanged(model, snap)


def test_failed_transform_leaves_model_unchanged():
    model = resnet18()
    model.layer2.eval()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="mode"):
        dyrep_fx.transform(model, mode="repvgg")
    assert_unchanged(model, snap)
    with pytest.raises(RuntimeError):  # the run-time pass with a wrong input: the real forward raises
        dyrep_fx.transform(model, example_inputs=(torch.randn(1, 5, 32, 32, dtype=torch.float64),))
    assert_unchanged(model, snap)
    assert all(not m._forward_hooks for m in model.modules())
    dyrep_fx.transform(model, mode="dbb")
    snap = snapshot(model)
    with pytest.raises(PassError, match="'dbb' mode"):
        dyrep_fx.transform(model, mode="online")
    assert_unchanged(model, snap)


class Locked(nn.Module):
    """A container that refuses to have its children replaced once built (a real, if unusual, pattern)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self._locked = True

    def __setattr__(self, name, value):
        if self.__dict__.get("_locked") and isinstance(value, nn.Module):
            raise AttributeError(f"{type(self).__name__} is locked: cannot replace {name!r}")
        super().__setattr__(name, value)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_failed_grow_leaves_model_exactly_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(3, 8), ConvBN(8, 8), Locked(8)).double()
    randomise_bns(model)
    ref = run_eval(model, X)
    dyrep_fx.transform(model)
    assert all(s.eligible for s in dyrep_fx.sites(model))
    model.train()
    snap = snapshot(model)
    with pytest.raises(AttributeError, match="locked"):
        dyrep_fx.grow(model)  # the first two sites grow, the third cannot be replaced: all is undone
    assert_unchanged(model, snap)
    assert not dyrep_fx.blocks(model)
    assert rel_err(run_eval(model, X), ref) == 0.0


# -- what is not eligible, and why ----------------------------------------------------------------------
class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.frozen = nn.Conv2d(8, 8, 3, padding=1)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        x = self.stem(x)
        return self.frozen(self.conv(self.conv(x)))


def test_a_conv_called_twice_is_a_site_and_a_frozen_one_is_not():
    model = Shared().double()
    dyrep_fx.transform(model)
    found = {s.name: s for s in dyrep_fx.sites(model)}
    assert found["stem.0"].eligible
    assert found["conv"].eligible and found["conv"].calls == 2
    assert not found["frozen"].eligible and "frozen" in found["frozen"].reason
    # with example inputs the count comes from a real run, and agrees
    model2 = Shared().double()
    dyrep_fx.transform(model2, example_inputs=(X,))
    assert next(s.calls for s in dyrep_fx.sites(model2) if s.name == "conv") == 2
    model.eval()
    before = model(X)
    assert set(dyrep_fx.grow(model).changed) == {"stem.0", "conv"}
    assert float((model(X) - before).abs().max() / before.abs().max()) < 1e-12


class TiedWeights(nn.Module):
    """Two conv modules sharing one weight Parameter (weight tying), each called once."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_conv_weights_are_not_grown_in_a_way_that_changes_the_other_conv():
    torch.manual_seed(0)
    model = TiedWeights().double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    ref = run_eval(model, x)
    dyrep_fx.transform(model)
    found = {s.name: s for s in dyrep_fx.sites(model)}
    if not found["a"].eligible:  # the library may refuse tied weights: fine, as long as it says why
        assert "shared" in found["a"].reason or "tied" in found["a"].reason
        return
    dyrep_fx.grow(model, ["a"])
    assert rel_err(run_eval(model, x), ref) <= TOL, "growing 'a' rewrote the weight it shares with 'b'"


class OtherConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3)
        self.c3 = nn.Conv3d(3, 4, 3)
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x1, x3, x2):
        return self.c1(x1).sum() + self.c3(x3).sum() + self.c2(self.up(x2)).sum()


def test_other_conv_types_are_listed_with_a_reason():
    model = OtherConvs()
    dyrep_fx.transform(model)
    found = {s.name: s for s in dyrep_fx.sites(model)}
    assert set(found) == {"c1", "c3", "up", "c2"}
    for name, cls in [("c1", "Conv1d"), ("c3", "Conv3d"), ("up", "ConvTranspose2d")]:
        assert not found[name].eligible and found[name].module_type == cls
        assert cls in found[name].reason and "Conv2d" in found[name].reason
    assert found["c1"].kernel_size == (3,) and found["c3"].kernel_size == (3, 3, 3)
    assert found["c2"].eligible
    with pytest.raises(PassError, match="'up'.*Conv2d"):
        dyrep_fx.grow(model, ["up"])


class TrainSwitch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.extra = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = self.extra(x)
        return x


def test_graph_that_differs_between_train_and_eval_is_reported():
    model = TrainSwitch()
    dyrep_fx.transform(model)
    state = dyrep_fx.api.state_of(model)
    assert state.traced.graph_differs_in_eval is True
    report = dyrep_fx.passes.analysis.run(state.traced, model)
    assert report.details["graph_differs_in_eval"] is True
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    dyrep_fx.transform(plain)
    assert dyrep_fx.api.state_of(plain).traced.graph_differs_in_eval is False


# -- the user's model object stays the user's -----------------------------------------------------------
def test_class_methods_attributes_and_hooks_survive():
    torch.manual_seed(0)
    model = Recorder().double()
    randomise_bns(model)
    calls = []
    model.register_forward_hook(lambda mod, inp, out: calls.append("root"))
    model.body[1][1].register_forward_hook(lambda mod, inp, out: calls.append("bn"))
    ref = run_eval(model, X)
    ref_features = model.features(X).detach()
    calls.clear()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model)
    assert type(model) is Recorder and model.tag == "keep-me"
    assert isinstance(model.body[0][0], dyrep_fx.RepConv2d)
    out = run_eval(model, X)
    assert calls == ["bn", "root"]
    assert rel_err(out, ref) <= TOL
    with torch.no_grad():
        assert rel_err(model.features(X), ref_features) <= TOL
    deploy = dyrep_fx.fold(model)
    assert type(deploy) is Recorder and deploy.tag == "keep-me"
    calls.clear()
    run_eval(deploy, X)
    assert calls == ["bn", "root"]


def test_fold_not_inplace_leaves_grown_model_intact():
    model = resnet18()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, ["conv1", "layer1.0.conv2", "layer3.0.downsample.0"])
    randomise_scales(model)
    ref = run_eval(model, X)
    snap = snapshot(model)
    deploy = dyrep_fx.fold(model, inplace=False)
    assert deploy is not model
    assert_unchanged(model, snap)
    assert set(dyrep_fx.blocks(model)) == {"conv1", "layer1.0.conv2", "layer3.0.downsample.0"}
    assert rel_err(run_eval(model, X), ref) == 0.0
    assert rel_err(run_eval(deploy, X), ref) <= TOL
    # the grown model can still be used: grow more, fold again
    dyrep_fx.grow(model, ["layer2.0.conv1"])
    assert rel_err(run_eval(model, X), ref) <= TOL
    assert not dyrep_fx.api.is_transformed(deploy)


def test_fold_inplace_returns_the_same_object():
    model = resnet18()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, ["layer1.1.conv1"])
    randomise_scales(model)
    ref = run_eval(model, X)
    deploy = dyrep_fx.fold(model, inplace=True)
    assert deploy is model and not dyrep_fx.blocks(model)
    assert isinstance(model.layer1[1].conv1, nn.Conv2d) and model.layer1[1].conv1.bias is None
    assert rel_err(run_eval(model, X), ref) <= TOL


#: One site of each geometry in resnet18: 7x7 stride 2, 3x3 with identity, 3x3 stride 2, 1x1 stride 2, 3x3.
SAMPLE = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "layer2.1.conv2"]


def test_online_growth_preserves_function_in_train_mode():
    """Online blocks compute one conv with an equal kernel: train-mode BN sees the same batch."""
    model = resnet18()
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        ref = reference(X)
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, SAMPLE)
    model.train()
    with torch.no_grad():
        out = model(X)
    assert rel_err(out, ref) <= TOL
    # and the running statistics move the same way
    grown_buffers = dict(model.named_buffers())
    for name, value in reference.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert rel_err(grown_buffers[name], value) <= TOL, name


def test_online_growth_preserves_gradients_of_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(3, 8), ConvBN(8, 8, stride=2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 3)).double()
    x1 = X.clone().requires_grad_(True)
    model.train()
    model(x1).square().sum().backward()
    dyrep_fx.transform(model)
    dyrep_fx.grow(model)
    x2 = X.clone().requires_grad_(True)
    model(x2).square().sum().backward()
    assert rel_err(x2.grad, x1.grad) <= TOL


def test_dbb_growth_preserves_function_in_eval_mode():
    model = resnet18()
    ref = run_eval(model, X)
    dyrep_fx.transform(model, mode="dbb")
    dyrep_fx.grow(model, SAMPLE)
    assert rel_err(run_eval(model, X), ref) <= TOL
    assert set(dyrep_fx.blocks(model)) == set(SAMPLE)
    assert all(b.mode == "dbb" for b in dyrep_fx.blocks(model).values())


def test_hooks_on_a_grown_conv_keep_firing():
    """A hook the user put on a conv (feature extraction, logging) must not silently stop firing."""
    torch.manual_seed(0)
    model = nn.Sequential(ConvBN(3, 8), ConvBN(8, 8)).double()
    seen = []
    model[1][0].register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    ref = run_eval(model, X)
    assert len(seen) == 1
    dyrep_fx.transform(model)
    dyrep_fx.grow(model)
    seen.clear()
    assert rel_err(run_eval(model, X), ref) <= TOL
    assert len(seen) == 1, "the forward hook on the grown conv '1.0' no longer fires"
    deploy = dyrep_fx.fold(model)
    seen.clear()
    run_eval(deploy, X)
    assert len(seen) == 1


def test_grown_model_survives_torch_save_and_load(tmp_path):
    model = resnet18()
    dyrep_fx.transform(model, mode="dbb")
    dyrep_fx.grow(model, ["layer1.0.conv1", "layer2.0.downsample.0"])
    randomise_bns(model, seed=9)
    ref = run_eval(model, X)
    torch.save(model, tmp_path / "grown.pt")
    loaded = torch.load(tmp_path / "grown.pt", weights_only=False)
    assert type(loaded) is torchvision.models.ResNet
    assert rel_err(run_eval(loaded, X), ref) == 0.0
    assert [s.name for s in dyrep_fx.sites(loaded)] == [s.name for s in dyrep_fx.sites(model)]
    assert rel_err(run_eval(dyrep_fx.fold(loaded), X), ref) <= TOL
