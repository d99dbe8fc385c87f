"""Branch kinds as registered units (:mod:`dyrep_fx.kinds`): the large-kernel kinds (RepLKNet's small kernel,
UniRepLKNet's dilated kernels, MobileOne's parallel copies) grow, cut and fold exactly in float64 under the
block's property sequences, apply where the geometry calls for them, grow and fold on torchvision's
convnext_tiny, and a user's own kind goes through the public API."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.numerics import rel_err
from helpers.profiles import examples
from helpers.strategies import ConvCfg, shuffle_state
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_block import EXACT_MODES, run_sequence
from torch import Tensor, nn

import dyrep_fx
from dyrep_fx.assembly import Term
from dyrep_fx.block import RepConv2d
from dyrep_fx.geometry import ConvGeometry
from dyrep_fx.kernels import channel_norms, embed_kernel
from dyrep_fx.kinds import (
    BRANCH_KINDS,
    DBB_KINDS,
    DYREP_KINDS,
    LARGE_KERNEL_KINDS,
    OREPA_KINDS,
    BranchKind,
    applicable_kinds,
    get_kind,
    kind_names,
    register_kind,
    unregister_kind,
)
from dyrep_fx.kinds.branch import Branch
from dyrep_fx.kinds.dilated import dilated_specs
from dyrep_fx.kinds.parallel import parallel_kind
from dyrep_fx.kinds.small_kernel import small_kernel_kind
from dyrep_fx.kinds.window_term import WindowTerm

SLOW_OK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
F64_TOL = 1e-10
LARGE = list(LARGE_KERNEL_KINDS)


@st.composite
def large_depthwise_cfgs(draw) -> ConvCfg:
    """A depthwise conv (multiplier 1 or 2) with a square odd kernel of 5, 7 or 9, any padding mode."""
    c = draw(st.integers(1, 4))
    k = draw(st.sampled_from([5, 7, 9]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    padding = draw(st.sampled_from(["same", "valid", "half", "int"]))
    if padding == "same" and stride != 1:
        padding = "half"
    if padding == "half":
        padding = dilation * (k // 2)
    elif padding == "int":
        padding = draw(st.integers(0, 4))
    span = dilation * (k - 1) + 1
    cfg = ConvCfg(cin=c, cout=c * draw(st.sampled_from([1, 2])), kernel=k, stride=stride, dilation=dilation,
                  groups=c, padding=padding, bias=draw(st.booleans()),
                  padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])),
                  h=draw(st.integers(span - 4, span + 3)), w=draw(st.integers(span - 4, span + 3)))
    assume(cfg.accepted_by_torch())
    return cfg


# ------------------------------------------------------------------------------------ the registry
def test_the_library_kinds_keep_their_order_and_sets():
    assert BRANCH_KINDS[:7] == ("1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity", "prior")
    assert LARGE == ["small_kxk", "dilated_kxk", "parallel_kxk"] == list(BRANCH_KINDS[7:])
    assert DBB_KINDS == ("1x1", "1x1_kxk", "1x1_avg")
    assert OREPA_KINDS == ("1x1", "1x1_kxk", "1x1_avg", "prior")
    assert DYREP_KINDS == ("1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity")  # the large ones: opt-in
    assert kind_names() == BRANCH_KINDS


@pytest.mark.parametrize("conv,takes", [
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), False),  # an ordinary depthwise 3x3
    (nn.Conv2d(8, 8, 7, padding=3), False),  # a dense 7x7 (a ResNet stem's kind of conv)
    (nn.Conv2d(8, 8, (7, 5), padding=(3, 2), groups=8), False),  # not square
    (nn.Conv2d(8, 8, 6, padding=3, groups=8), False),  # even
    (nn.Conv2d(8, 8, 7, padding=3, groups=8), True),  # ConvNeXt's depthwise 7x7
    (nn.Conv2d(8, 16, 5, stride=2, padding=2, groups=8), True),  # EfficientNet's kind, multiplier 2
    (nn.Conv2d(4, 4, 31, padding=15, groups=4), True),  # RepLKNet's 31x31
])
def test_large_kernel_kinds_apply_where_the_geometry_calls_for_them(conv, takes):
    geometry = ConvGeometry.from_conv(conv)
    assert all((k in applicable_kinds(geometry)) == takes for k in LARGE)
    blk = RepConv2d(conv)
    if not takes:
        with pytest.raises(ValueError, match="does not apply.*needs a"):
            blk.grow(["small_kxk"])
        assert not blk.grown
    else:
        assert blk.grow() and set(LARGE) <= set(blk.kinds)  # grow()'s default takes them


def test_kernel_sizes_follow_the_families():
    def geometry(k):
        return ConvGeometry.from_conv(nn.Conv2d(2, 2, k, padding=k // 2, groups=2))
    like = torch.zeros(1)
    assert get_kind("small_kxk").make(geometry(7), "online", 0.1, like).specs == [(3, 1)]
    assert get_kind("small_kxk").make(geometry(31), "online", 0.1, like).specs == [(5, 1)]
    assert dilated_specs(geometry(7)) == [(3, 2), (3, 3)]
    assert dilated_specs(geometry(31)) == [(9, 2), (3, 4), (3, 5), (3, 7)]
    for k in (5, 7, 9, 11, 13, 15, 17, 21):
        assert all(r * (s - 1) + 1 <= k for s, r in dilated_specs(geometry(k)))  # every footprint fits
    assert get_kind("parallel_kxk").make(geometry(7), "online", 0.1, like).specs == [(7, 1)] * 3


def test_the_dilated_kernel_is_a_zero_inserted_embedding():
    conv = nn.Conv2d(2, 2, 7, padding=3, groups=2).double()
    blk = RepConv2d(conv)
    (branch,) = blk.grow(["dilated_kxk"])
    weights = [c.weight.detach() for c in branch.convs]  # 3x3 at dilation 2, then 3
    want = torch.zeros(2, 1, 7, 7, dtype=torch.float64)
    want[..., 1:6:2, 1:6:2] += weights[0]
    want[..., 0:7:3, 0:7:3] += weights[1]
    assert torch.allclose(branch.raw_kernel().detach(), want, atol=0, rtol=1e-15)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    run = sum(nn.functional.conv2d(x, w, None, 1, r, r, 2) for w, r in zip(weights, (2, 3)))  # "same" each
    assert rel_err(nn.functional.conv2d(x, want, None, 1, 3, 1, 2), run) < F64_TOL


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("mode,train", EXACT_MODES)
@settings(max_examples=examples(30), **SLOW_OK)
@given(cfg=large_depthwise_cfgs(), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_sequence_exact_float64(mode, train, cfg, data, seed):
    """test_block's random grow / cut / nest sequences, on the geometries the large-kernel kinds take."""
    torch.manual_seed(seed)
    run_sequence(cfg, mode, train, torch.float64, F64_TOL, data)


@pytest.mark.parametrize("mode", ["online", "dbb"])
@settings(max_examples=examples(20), **SLOW_OK)
@given(cfg=large_depthwise_cfgs(), kinds=st.lists(st.sampled_from(LARGE), min_size=1, unique=True),
       seed=st.integers(0, 2**31 - 1))
def test_each_large_kernel_kind_grows_cuts_and_folds_exactly(mode, cfg, kinds, seed):
    torch.manual_seed(seed)
    blk = RepConv2d(cfg.build(), mode).eval()
    x = cfg.input()
    with torch.no_grad():
        before = blk(x)
        blk.grow(kinds)
        assert rel_err(blk(x), before) <= F64_TOL, "growth changed the function"
        shuffle_state(blk)
        trained = blk(x)
        assert rel_err(blk.to_conv()(x), trained) <= F64_TOL, "the fold differs"
        blk.cut(kinds[:1])
        assert rel_err(blk(x), trained) <= F64_TOL, "the cut changed the function"


@pytest.mark.parametrize("kind", LARGE)
def test_a_new_online_branch_starts_at_the_init_share(kind):
    blk = RepConv2d(nn.Conv2d(6, 12, 7, padding=3, groups=6).double())
    (branch,) = blk.grow([kind])
    assert channel_norms(branch.raw_kernel().detach()).min() > 0
    assert blk.importance()[kind] == pytest.approx(blk.init_scale, rel=1e-9)


def test_gradients_reach_every_large_kernel_parameter():
    for mode in ("online", "dbb"):
        blk = RepConv2d(nn.Conv2d(3, 3, 9, padding=4, groups=3).double(), mode).train()
        blk.grow(LARGE)
        blk(torch.randn(2, 3, 12, 12, dtype=torch.float64)).square().sum().backward()
        for name, p in blk.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{mode}: no gradient reaches {name}"


def test_a_small_kernel_of_any_odd_size_that_fits():
    five = small_kernel_kind(5, name="small_5x5_test")
    register_kind(five)
    try:
        conv = nn.Conv2d(2, 2, 7, padding=3, groups=2).double()
        blk = RepConv2d(conv).eval()
        x = torch.randn(1, 2, 10, 10, dtype=torch.float64)
        before = blk(x).detach()
        (branch,) = blk.grow(["small_5x5_test"])
        assert branch.specs == [(5, 1)] and rel_err(blk(x).detach(), before) <= F64_TOL
        assert "small_5x5_test" not in RepConv2d(nn.Conv2d(2, 2, 5, padding=2, groups=2)).available_kinds()
    finally:
        unregister_kind("small_5x5_test")
    with pytest.raises(ValueError, match="odd"):
        small_kernel_kind(4, name="even")
    assert parallel_kind(2, "two_copies", anywhere=True).applies(ConvGeometry.from_conv(nn.Conv2d(2, 2, 3))) is None


# ------------------------------------------------------------------------------------ a user's kind
class CornerBranch(Branch):
    """A user's kind: a 1x1 conv on the window's top-left tap (online: a window term; dbb: conv + BN)."""

    kind = "corner"

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.conv = nn.Conv2d(geom.in_channels, geom.out_channels, 1, groups=geom.groups, bias=False,
                              device=like.device, dtype=like.dtype)

    def raw_kernel(self) -> Tensor:
        return embed_kernel(self.conv.weight, self.geom.kernel_size, (0, 0))

    def term(self) -> Term:
        return WindowTerm(self.conv.weight, self.scale, (0, 0))

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        from dyrep_fx.kernels import fuse_bn
        bn = self.bn
        w, b = fuse_bn(self.conv.weight, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        return embed_kernel(w, self.geom.kernel_size, (0, 0)), b

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        window = self.geom.window(self.geom.pad_input(x) if xp is None else xp, (1, 1), (0, 0))
        return self.bn(self.geom.conv_valid(window, self.conv.weight))


@pytest.fixture
def corner_kind():
    kind = register_kind(BranchKind("corner", CornerBranch,
                                    lambda g: None if min(g.kernel_size) > 1 else "needs a window"))
    yield kind
    unregister_kind("corner")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


@pytest.mark.parametrize("mode", ["online", "dbb"])
def test_a_user_registered_kind_grows_through_the_public_api(corner_kind, mode):
    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    want = model(x).detach()
    dyrep_fx.transform(model, mode=mode)
    with pytest.raises(dyrep_fx.passes.base.PassError, match="'corner'"):
        dyrep_fx.grow(model, ["b"], ["corner"])  # a 1x1 does not take it
    dyrep_fx.grow(model, ["a"], ["corner", "1x1"])
    assert model.a.kinds == ["1x1", "corner"]  # user kinds come after the library's
    assert rel_err(model(x), want) <= F64_TOL
    shuffle_state(model.a)
    grown = model(x).detach()
    spec = json.loads(json.dumps(dyrep_fx.structure(model)))
    twin = Net().double().eval()
    dyrep_fx.transform(twin, mode=mode)
    dyrep_fx.restore(twin, spec)
    twin.load_state_dict(model.state_dict(), strict=True)
    assert rel_err(twin(x), grown) <= F64_TOL
    deploy = dyrep_fx.fold(model)
    fresh = Net().double().eval()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    assert rel_err(fresh(x), grown) <= F64_TOL


def test_a_kind_name_is_taken_once(corner_kind):
    with pytest.raises(ValueError, match="already registered"):
        register_kind(BranchKind("corner", CornerBranch, order=3))
    assert register_kind(corner_kind) is corner_kind  # the same kind again: nothing changes
    with pytest.raises(ValueError, match="unknown sets"):
        register_kind(BranchKind("other", CornerBranch, sets=frozenset({"mine"})))


# ------------------------------------------------------------------------------------ convnext_tiny
def _train(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    model.train()
    optimizer.zero_grad()
    model(x).logsumexp(1).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("mode,driver", [("online", "grow"), ("dbb", "grow"), ("online", "dyrep")])
def test_convnext_tiny_grows_trains_and_folds_with_the_large_kernel_kinds(mode, driver):
    """torchvision's convnext_tiny: the 7x7 depthwise convs (and only they) take the large-kernel kinds;
    grown (by ``grow``'s default or by DyRep with ``DYREP_KINDS + LARGE_KERNEL_KINDS``), trained two steps and folded, it loads strictly into a
    fresh convnext_tiny with equal outputs."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dyrep_fx.transform(model, mode=mode, example_inputs=(x,))
    sites = [s for s in dyrep_fx.sites(model) if s.eligible]
    large = [s.name for s in sites if "small_kxk" in s.kinds]
    assert len(large) == 18 and all(s.kernel_size == (7, 7) and s.groups == s.in_channels
                                    for s in sites if s.name in large)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.eval()
    with torch.no_grad():
        before = model(x)
    if driver == "grow":
        dyrep_fx.grow(model, large)  # every kind that applies: DyRep's six where they do, and the three
    else:
        ctl = dyrep_fx.DyRep(model, optimizer, interval=1, topk=2, grow_at_start=0.0, kinds=DYREP_KINDS + LARGE_KERNEL_KINDS,
                             candidates=lambda site, model: site.kernel_size == (7, 7))
        _train(model, optimizer, x)
        model.eval()
        with torch.no_grad():
            before = model(x)
        grown = ctl.step().grown
        assert len(grown) == 2 and all(set(LARGE) <= set(kinds) for kinds in grown.values())
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), before) <= F64_TOL
    for _ in range(2):
        _train(model, optimizer, x)
    model.eval()
    with torch.no_grad():
        trained = model(x)
        deploy = dyrep_fx.fold(model)
        fresh = torchvision.models.convnext_tiny(weights=None).double().eval()
        fresh.load_state_dict(deploy.state_dict(), strict=True)
        assert rel_err(fresh(x), trained) <= F64_TOL
