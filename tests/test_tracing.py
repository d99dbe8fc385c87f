"""``dyrep_fx.tracing.trace_model``: leaf fallback, forest fallback, run-time facts, and no side effects."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import dyrep_fx
from dyrep_fx.tracing import TracedModel, TraceFailure, trace_model

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DataDependent(nn.Module):
    """Control flow on a tensor value: torch.fx raises a TraceError in this forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class Wrapper(nn.Module):
    """Traceable itself; only its grandchild ``inner.dyn`` is not."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pre = conv_bn(c, c)
        self.inner = nn.Sequential(nn.Identity(), DataDependent(c))

    def forward(self, x):
        return self.inner(self.pre(x))


class LeafNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.a = Wrapper(4)
        self.b = DataDependent(4)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(self.b(self.a(self.stem(x))))


def sites_by_name(model: nn.Module) -> dict:
    return {s.name: s for s in dyrep_fx.sites(model)}


# -- leaf fallback --------------------------------------------------------------------------------------
def test_leaf_fallback_makes_only_the_innermost_failing_modules_leaves():
    model = LeafNet()
    traced = trace_model(model)
    assert traced.root_traced
    assert set(traced.untraceable) == {"a.inner.1", "b"}
    assert all("TraceError" in why or "control flow" in why for why in traced.untraceable.values())
    assert all("\n" not in why for why in traced.untraceable.values())
    # convs outside the leaves are traced, with their users
    assert set(traced.convs) == {"stem.0", "a.pre.0", "head"}
    assert traced.convs["stem.0"].calls == 1 and traced.convs["stem.0"].next_bn == "stem.1"
    assert traced.convs["a.pre.0"].next_bn == "a.pre.1"
    assert traced.convs["head"].next_bn is None and traced.convs["head"].users == ["output:output"]
    assert traced.leaf_containing("a.inner.1.conv") == "a.inner.1"
    assert traced.leaf_containing("b.conv") == "b"
    assert traced.leaf_containing("head") is None and traced.leaf_containing("bb") is None


def test_convs_inside_leaves_are_ineligible_naming_the_leaf():
    model = LeafNet()
    dyrep_fx.transform(model)
    found = sites_by_name(model)
    assert set(found) == {"stem.0", "a.pre.0", "a.inner.1.conv", "b.conv", "head"}
    assert "'a.inner.1'" in found["a.inner.1.conv"].reason and not found["a.inner.1.conv"].eligible
    assert "'b'" in found["b.conv"].reason and not found["b.conv"].eligible
    assert found["stem.0"].eligible and found["a.pre.0"].eligible and found["head"].eligible


def test_leaf_fallback_keeps_function_after_growth():
    torch.manual_seed(0)
    model = LeafNet().double().eval()
    x = X.double()
    with torch.no_grad():
        ref = model(x)
    dyrep_fx.transform(model)
    assert set(dyrep_fx.grow(model).changed) == {"stem.0", "a.pre.0", "head"}
    with torch.no_grad():
        out = model(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-9


def test_leaf_modules_argument_stops_tracing_into_a_class():
    model = nn.Sequential(conv_bn(3, 4), Wrapper(4))
    traced = trace_model(model, leaf_modules=[Wrapper])
    assert "1.pre.0" not in traced.convs and not traced.untraceable and traced.root_traced
    assert traced.convs["0.0"].next_bn == "0.1"


# -- forest fallback ------------------------------------------------------------------------------------
class ListRoot(nn.Module):
    """The root's own forward uses ``len()`` of a list argument (like an FPN neck)."""

    def __init__(self) -> None:
        super().__init__()
        self.lateral = nn.ModuleList([conv_bn(3, 4), conv_bn(5, 4)])
        self.out = conv_bn(4, 4)

    def forward(self, feats):
        n = len(feats)
        merged = sum(self.lateral[i](feats[i]) for i in range(n))
        return self.out(merged)


FEATS = [torch.randn(1, 3, 8, 8), torch.randn(1, 5, 8, 8)]


def test_forest_fallback_without_example_inputs():
    model = ListRoot()
    traced = trace_model(model)
    assert not traced.root_traced
    assert "" in traced.untraceable and "len" in traced.untraceable[""]
    # each child was traced on its own: the convs are known, with their BatchNorms
    assert set(traced.convs) == {"lateral.0.0", "lateral.1.0", "out.0"}
    assert traced.convs["lateral.1.0"].graph == "lateral.1" and traced.convs["lateral.1.0"].calls == 1
    assert traced.convs["out.0"].next_bn == "out.1"
    dyrep_fx.transform(model)
    for site in dyrep_fx.sites(model):
        assert not site.eligible and "example_inputs" in site.reason, site


def test_forest_fallback_with_example_inputs_counts_calls_at_run_time():
    model = ListRoot()
    dyrep_fx.transform(model, example_inputs=[FEATS])
    found = sites_by_name(model)
    assert all(s.eligible for s in found.values()), {n: s.reason for n, s in found.items()}
    assert found["lateral.1.0"].calls == 1 and found["lateral.1.0"].input_shape == (1, 5, 8, 8)
    assert found["out.0"].output_shape == (1, 4, 8, 8)


def test_list_argument_traces_with_placeholders_when_example_inputs_are_given():
    model = ListRoot()
    traced = trace_model(model, (FEATS,))
    assert traced.root_traced and not traced.untraceable
    assert all(use.runtime_calls == 1 for use in traced.convs.values())
    assert traced.convs["lateral.0.0"].next_bn == "lateral.0.1"


class DynamicRoot(nn.Module):
    """Data-dependent control flow in the root's forward: only the forest (and run time) can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 4)
        self.b = conv_bn(4, 4)
        self.shared = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if y.mean() > -100:
            y = self.shared(self.shared(y))
        return self.b(y)


def test_forest_plus_run_time_counts_find_the_shared_conv():
    model = DynamicRoot()
    dyrep_fx.transform(model, example_inputs=(X,))
    state = dyrep_fx.api.state_of(model)
    assert not state.traced.root_traced
    found = sites_by_name(model)
    assert found["a.0"].eligible and found["b.0"].eligible
    assert found["shared"].eligible and found["shared"].calls == 2  # counted at run time


def test_concrete_args_fix_a_mode_flag():
    class Flag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv_bn(3, 4)

        def forward(self, x, double: bool = False):
            y = self.conv(x)
            if double:
                y = y * 2
            return y

    # without concrete_args the root is traced again with its flag at its default (double=False)
    assert trace_model(Flag()).root_traced
    traced = trace_model(Flag(), concrete_args={"double": True})
    assert traced.root_traced and not traced.untraceable and traced.convs["conv.0"].next_bn == "conv.1"


def test_nothing_traceable_and_no_conv_are_clear_errors():
    with pytest.raises(TraceFailure, match="holds no convolution"):
        trace_model(nn.Sequential(nn.Linear(3, 3)))

    class OnlyRoot(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)  # a direct conv child: nothing for the forest to trace

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    with pytest.raises(TraceFailure, match="nothing of OnlyRoot could be traced") as err:
        trace_model(OnlyRoot())
    assert "example_inputs" in str(err.value) and "Traceback" not in str(err.value)
    # with example inputs the run-time pass finds the conv
    traced = trace_model(OnlyRoot(), (X,))
    assert traced.convs["conv"].runtime_calls == 1


# -- facts recorded -------------------------------------------------------------------------------------
class Uses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.c1(x))
        z = self.c2(y)
        y = self.bn2(z) + z  # c2 feeds its BN and the residual
        y = torch.relu(self.c3(y))
        y = self.bn3(self.shared(y))
        return self.bn3(self.shared(y))


def test_users_next_bn_calls_and_norm_calls():
    traced = trace_model(Uses())
    assert traced.convs["c1"].next_bn == "bn1" and traced.convs["c1"].users == ["call_module:bn1"]
    assert traced.convs["c2"].next_bn is None and len(traced.convs["c2"].users) == 2
    c3 = traced.convs["c3"]
    assert c3.next_bn is None and len(c3.users) == 1 and c3.users[0].startswith("call_function:")
    assert traced.convs["shared"].calls == 2 and traced.convs["shared"].next_bn is None
    assert traced.norm_calls == {"bn1": 1, "bn2": 1, "bn3": 2}
    assert traced.graph is not None and not traced.graph_differs_in_eval


def test_traced_model_copies_and_pickles_without_the_graph():
    traced = trace_model(Uses())
    clone = copy.deepcopy(traced)
    assert isinstance(clone, TracedModel) and clone.graph is None and traced.graph is not None
    assert clone.convs == traced.convs and clone.norm_calls == traced.norm_calls
    again = pickle.loads(pickle.dumps(traced))
    assert again.graph is None and again.convs == traced.convs


def test_graph_differs_in_eval_is_detected():
    class Switch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return self.conv(x) if self.training else self.conv(x) * 0.5

    assert trace_model(Switch()).graph_differs_in_eval
    assert not trace_model(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Dropout())).graph_differs_in_eval


# -- no side effects ------------------------------------------------------------------------------------
class CountsTrain(nn.Module):
    """Overrides ``train()`` (like mmdet's norm_eval backbones) and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(3, 4)
        self.frozen = conv_bn(4, 4)
        self.train_calls = 0

    def train(self, mode: bool = True):
        self.train_calls += 1
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x):
        return self.frozen(self.body(x))


def flags(model: nn.Module) -> list[tuple[str, bool]]:
    return [(n, m.training) for n, m in model.named_modules()]


@pytest.mark.parametrize("with_inputs", [False, True])
@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_trace_model_never_changes_training_flags(start, with_inputs):
    model = CountsTrain()
    model.train(start != "eval")
    if start == "mixed":
        model.body[1].eval()
    before, calls = flags(model), model.train_calls
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, (X,) if with_inputs else None)
    assert flags(model) == before and model.train_calls == calls
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k  # the run-time pass runs in eval mode: no BN update
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_trace_model_restores_flags_and_hooks_when_the_run_fails():
    model = LeafNet()
    model.train()
    model.a.eval()
    before = flags(model)
    with pytest.raises(RuntimeError):
        trace_model(model, (torch.randn(1, 7, 8, 8),))  # wrong channel count: the real forward raises
    assert flags(model) == before
    for m in model.modules():
        assert not m._forward_hooks


def test_trace_model_flags_restored_for_forest_and_leaves():
    for model in (ListRoot(), LeafNet(), DynamicRoot()):
        model.train()
        list(model.children())[0].eval()
        before = flags(model)
        trace_model(model)
        assert flags(model) == before


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it becomes a leaf of its parent."""

    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.direct = direct
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        for _ in range(int(x.abs().sum() > 0) + 1):  # twice, decided by the data
            x = torch.relu(self.conv(x))
        if self.direct:  # the weight used without the module, as some heads do
            return nn.functional.conv2d(x, self.other.weight, self.other.bias, padding=1)
        return self.other(x)


class WithUntraceable(nn.Module):
    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.body = Untraceable(direct)

    def forward(self, x):
        return self.body(self.stem(x))


def test_convs_inside_untraceable_code_need_example_inputs():
    model = WithUntraceable()
    dyrep_fx.transform(model)
    found = sites_by_name(model)
    assert found["stem.0"].eligible
    reason = found["body.conv"].reason
    assert not found["body.conv"].eligible and "'body', which torch.fx could not trace" in reason
    assert "pass example_inputs so that its calls can be counted at run time" in reason


def test_convs_inside_untraceable_code_are_sites_with_example_inputs():
    model = WithUntraceable().double()
    x = X.double()
    dyrep_fx.transform(model, example_inputs=(x,))
    found = sites_by_name(model)
    assert "body" in dyrep_fx.api.state_of(model).traced.untraceable
    assert found["body.conv"].eligible and found["body.conv"].calls == 2
    assert found["body.other"].eligible and found["body.other"].calls == 1
    assert all("example_inputs" not in (s.reason or "") for s in found.values())
    model.eval()
    before = model(x)
    dyrep_fx.grow(model, ["body.conv", "body.other"])
    assert float((model(x) - before).abs().max() / before.abs().max()) < 1e-12
    deploy = dyrep_fx.fold(model)
    fresh = WithUntraceable().double()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    assert float((fresh.eval()(x) - before).abs().max() / before.abs().max()) < 1e-12


def test_a_weight_used_outside_its_conv_in_untraceable_code_is_refused():
    model = WithUntraceable(direct=True)
    dyrep_fx.transform(model, example_inputs=(X,))
    found = sites_by_name(model)
    assert found["body.conv"].eligible
    other = found["body.other"]
    assert not other.eligible and "conv2d takes its weight outside its forward" in other.reason
    with pytest.raises(dyrep_fx.passes.PassError, match="outside its forward"):
        dyrep_fx.grow(model, ["body.other"])


def test_torchscript_modules_are_refused_naming_torchscript():
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    for compiled in (torch.jit.script(eager), torch.jit.trace(eager.eval(), X)):
        with pytest.raises(TraceFailure, match="is a TorchScript module.*pass the eager nn.Module") as err:
            dyrep_fx.transform(compiled)
        assert "holds no convolution" not in str(err.value)
        assert not dyrep_fx.api.is_transformed(compiled)
    # an eager model whose convs all sit inside scripted children says why it sees none
    wrapper = nn.Sequential(torch.jit.script(eager))
    with pytest.raises(TraceFailure, match=r"holds no convolution.*\['0'\] are TorchScript modules"):
        dyrep_fx.transform(wrapper)
