"""``passes.analysis``: every conv site, its geometry, and why it can or cannot grow."""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.nn.utils import parametrizations

import dyrep_fx
from dyrep_fx.passes import analysis
from dyrep_fx.tracing import trace_model


def traced_sites(model: nn.Module, mode: str = "online", inputs=None) -> dict[str, analysis.Site]:
    traced = trace_model(model, inputs)
    return {s.name: s for s in analysis.analyse(traced, model, mode)}


class Geometries(nn.Module):
    """One conv of each interesting geometry, each feeding its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.k3_stride = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.k3_valid = nn.Conv2d(4, 4, 3, padding=0, bias=False)
        self.pw = nn.Conv2d(4, 4, 1, bias=False)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.row = nn.Conv2d(4, 4, (1, 5), padding=(0, 2), bias=False)
        self.same_dil = nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False)
        self.wide = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bns = nn.ModuleDict({n: nn.BatchNorm2d(8 if n == "wide" else 4)
                                  for n in ["k3", "k3_stride", "k3_valid", "pw", "dw", "row", "same_dil", "wide"]})

    def forward(self, x):
        outs = []
        for name in self.bns:
            outs.append(self.bns[name](getattr(self, name)(x)).mean())
        return sum(outs)


ALL = ["1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity", "prior"]


def test_kinds_follow_geometry():
    found = traced_sites(Geometries())
    assert all(s.eligible for s in found.values())
    assert found["k3"].kinds == ALL
    assert found["k3_stride"].kinds == [k for k in ALL if k != "identity"]
    assert found["k3_valid"].kinds == [k for k in ALL if k != "identity"]  # no padding: output is shifted
    assert found["pw"].kinds == ["1x1_kxk", "identity"]  # a 1x1 C->C conv: RepVGG's identity applies
    assert found["dw"].kinds == ALL and found["dw"].groups == 4
    assert found["row"].kinds == ["1x1", "1x1_kxk", "1x1_avg", "identity", "prior"]
    assert found["same_dil"].kinds == ALL and found["same_dil"].padding == "same"
    assert found["same_dil"].dilation == (2, 2)
    assert found["wide"].kinds == [k for k in ALL if k != "identity"]
    for name, site in found.items():
        assert site.next_bn == f"bns.{name}" and site.calls == 1 and site.depth == 0


def test_dbb_mode_needs_a_batchnorm_after_a_bias_free_conv():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_bn = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.to_relu = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.biased = nn.Conv2d(4, 4, 3, padding=1, bias=True)

        def forward(self, x):
            return self.biased(torch.relu(self.to_relu(self.bn(self.to_bn(x)))))

    online = traced_sites(Net(), "online")
    assert all(s.eligible for s in online.values())
    dbb = traced_sites(Net(), "dbb")
    assert dbb["to_bn"].eligible and dbb["biased"].eligible
    assert not dbb["to_relu"].eligible and "BatchNorm" in dbb["to_relu"].reason
    assert "online" in dbb["to_relu"].reason


def test_parametrized_and_frozen_weights_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    parametrizations.weight_norm(model[0])
    model[1].weight.requires_grad_(False)
    found = traced_sites(model)
    assert not found["0"].eligible and "parametriz" in found["0"].reason
    assert not found["1"].eligible and "frozen" in found["1"].reason
    assert found["2"].eligible


def test_nested_sites_and_depth_limit():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    dyrep_fx.transform(model)
    dyrep_fx.grow(model, ["0"], ["1x1_kxk", "1x1"])
    found = {s.name: s for s in dyrep_fx.sites(model)}
    outer = found["0"]
    assert outer.module_type == "RepConv2d" and outer.grown == ["1x1", "1x1_kxk"]
    assert outer.kinds == ["1x1_avg", "1xk", "kx1", "identity", "prior"]
    inner = found["0.branches.1x1_kxk.conv2"]
    assert inner.depth == 1 and inner.eligible and inner.calls == 1 and inner.next_bn is None
    assert inner.kinds == [k for k in ALL if k != "identity"] or inner.kinds == ALL
    dyrep_fx.grow(model, [inner.name], ["1x1_kxk"])
    found = {s.name: s for s in dyrep_fx.sites(model)}
    deep = found["0.branches.1x1_kxk.conv2.branches.1x1_kxk.conv2"]
    assert deep.depth == 2 and not deep.eligible and "nested 2 deep" in deep.reason
    assert deep.kinds == []
    assert list(found) == ["0", "0.branches.1x1_kxk.conv2", "0.branches.1x1_kxk.conv2.branches.1x1_kxk.conv2"]


def test_run_reports_eligible_and_skipped_without_changing_anything():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ok = nn.Conv2d(3, 4, 3)
            self.shared = nn.Conv2d(4, 4, 1)
            self.direct = nn.Conv2d(4, 4, 1)
            self.c1d = nn.Conv1d(4, 4, 1)

        def forward(self, x):
            y = self.shared(self.shared(self.ok(x)))
            y = y + nn.functional.conv2d(y, self.direct.weight)  # the weight used without the module
            return self.c1d(y.flatten(2))

    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analysis.run(trace_model(model), model)
    assert report.name == "analysis" and not report.changed
    assert report.details["eligible"] == ["ok", "shared"]
    assert set(report.skipped) == {"direct", "c1d"}
    assert "the traced graph reads weight" in report.skipped["direct"] and "Conv1d" in report.skipped["c1d"]
    assert report.details["untraceable"] == {} and report.details["graph_differs_in_eval"] is False
    assert [s.name for s in report.details["sites"]] == ["ok", "shared", "direct", "c1d"]
    json.dumps([s.as_dict() for s in report.details["sites"]])
    assert "1 skipped" not in str(report) and "2 skipped" in str(report)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.ok) is nn.Conv2d


def test_never_called_conv_is_reported():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(3, 3, 3)
            self.unused = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return self.used(x)

    found = traced_sites(Net())
    assert found["used"].eligible
    assert not found["unused"].eligible and "never called" in found["unused"].reason
    # with example inputs the run-time count (0) says the same
    found = traced_sites(Net(), inputs=(torch.randn(1, 3, 8, 8),))
    assert not found["unused"].eligible and found["unused"].calls in (0, None)
