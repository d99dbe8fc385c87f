"""OpenMMLab backbones: mmdet ResNet and mmseg ResNetV1c (dilated), as the configs build them.

They keep their own ``train()`` override (``frozen_stages``, ``norm_eval``); their frozen convs must not
grow; dilation must be kept exactly; the folded weights load strictly into a fresh backbone. Note that
these backbones' ``train()`` returns None, so ``m.eval()`` is called on its own line.
"""

from __future__ import annotations

import pytest
import torch
from helpers.numerics import randomise, rel_err
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import dyrep_fx

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
mmdet_backbones = pytest.importorskip("mmdet.models.backbones")
mmseg_backbones = pytest.importorskip("mmseg.models.backbones")

TOL = 1e-9


# float64 / tiny convs on CPU: one intra-op thread is much faster than two here.
pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(1, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def make(kind: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mmdet":
        model = mmdet_backbones.ResNet(depth=50, frozen_stages=1, norm_eval=True, **extra)
    else:
        model = mmseg_backbones.ResNetV1c(depth=50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                                          contract_dilation=True, frozen_stages=1, norm_eval=True, **extra)
    model.double()
    model.train()  # applies frozen_stages and norm_eval, as a runner does
    return model


STEM = {"mmdet": ("conv1",), "mmseg": ("stem.0", "stem.3", "stem.6")}




def features(model: nn.Module) -> tuple[torch.Tensor, ...]:
    model.eval()
    with torch.no_grad():
        outs = model(X)
    model.train()
    return tuple(outs)


def max_rel(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    assert len(a) == len(b) == 4
    return max(rel_err(x, y) for x, y in zip(a, b))


def frozen_names(model: nn.Module, kind: str) -> list[str]:
    prefixes = ("conv1.", "bn1.", "layer1.") if kind == "mmdet" else ("stem.", "layer1.")
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def check_train_override(model: nn.Module, kind: str) -> None:
    """After ``model.train()``: every BN in eval mode (norm_eval), stage 1 frozen and in eval mode."""
    model.train()
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(m.training for m in bns)
    params = dict(model.named_parameters())
    frozen = frozen_names(model, kind)
    assert frozen and not any(params[n].requires_grad for n in frozen)
    assert not model.layer1.training
    assert all(p.requires_grad for n, p in params.items() if n.startswith("layer2."))
    assert model.layer2.training


@pytest.mark.parametrize("kind", ["mmdet", "mmseg"])
def test_backbone_grow_fold_strict_load(kind):
    model = make(kind)
    cls = type(model)
    keys = list(model.state_dict())
    randomise(model, seed=1, branch_bound=0.3)
    ref = features(model)

    dyrep_fx.transform(model)
    found = {s.name: s for s in dyrep_fx.sites(model)}
    frozen_sites = [n for n in found if n.startswith(STEM[kind]) or n.startswith("layer1.")]
    assert frozen_sites and len(frozen_sites) >= 11
    for name in frozen_sites:
        assert not found[name].eligible and "frozen" in found[name].reason, name
    eligible = [n for n, s in found.items() if s.eligible]
    assert eligible and all(n.startswith(("layer2.", "layer3.", "layer4.")) for n in eligible)
    assert len(eligible) + len(frozen_sites) == len(found)

    report = dyrep_fx.grow(model)
    assert set(report.changed) == set(eligible)
    assert not any(isinstance(model.get_submodule(n), dyrep_fx.RepConv2d) for n in frozen_sites)
    assert type(model) is cls
    check_train_override(model, kind)
    assert max_rel(features(model), ref) <= TOL

    if kind == "mmseg":  # dilation (contracted in the first block of a dilated stage) is kept
        assert model.layer3[0].conv2.geometry.dilation == (1, 1)
        assert model.layer3[1].conv2.geometry.dilation == (2, 2)
        assert model.layer4[0].conv2.geometry.dilation == (2, 2)
        assert model.layer4[2].conv2.geometry.dilation == (4, 4)
        assert model.layer4[2].conv2.geometry.pads == ((4, 4), (4, 4))

    randomise(model, seed=2, branch_bound=0.3)
    grown = features(model)
    folded = dyrep_fx.fold(model)
    assert type(folded) is cls and not dyrep_fx.blocks(folded)
    assert list(folded.state_dict()) == keys
    assert max_rel(features(folded), grown) <= TOL
    check_train_override(folded, kind)

    fresh = make(kind)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert max_rel(features(fresh), grown) <= TOL
    if kind == "mmseg":
        assert fresh.layer4[2].conv2.dilation == (4, 4) and fresh.layer4[2].conv2.padding == (4, 4)


def test_dilated_sites_in_dbb_mode():
    """dbb branches run on the padded input with the conv's dilation: exact in eval mode."""
    model = make("mmseg")
    randomise(model, seed=1, branch_bound=0.3)
    ref = features(model)
    dyrep_fx.transform(model, mode="dbb")
    names = ["layer3.0.conv2", "layer3.1.conv2", "layer4.0.conv2", "layer4.2.conv2", "layer4.0.downsample.0"]
    dyrep_fx.grow(model, names)
    check_train_override(model, "mmseg")
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))  # the blocks' BNs too
    assert max_rel(features(model), ref) <= TOL
    randomise(model, seed=3, branch_bound=0.3)
    grown = features(model)
    folded = dyrep_fx.fold(model)
    assert max_rel(features(folded), grown) <= TOL
    fresh = make("mmseg")
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert max_rel(features(fresh), grown) <= TOL


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint:UserWarning")
def test_with_cp_bottlenecks_become_untraceable_leaves():
    torch.manual_seed(0)
    model = mmdet_backbones.ResNet(depth=50, with_cp=True).double()
    model.train()
    randomise(model, seed=1, branch_bound=0.3)
    ref = features(model)
    dyrep_fx.transform(model)
    traced = dyrep_fx.api.state_of(model).traced
    blocks = [f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), start=1) for j in range(n)]
    assert traced.root_traced and sorted(traced.untraceable) == sorted(blocks)
    assert all("control flow" in why for why in traced.untraceable.values())
    found = {s.name: s for s in dyrep_fx.sites(model)}
    assert found["conv1"].eligible and found["conv1"].next_bn == "bn1"
    for name, site in found.items():
        if name != "conv1":
            leaf = name.rsplit(".", 1)[0] if "downsample" not in name else name.rsplit(".", 2)[0]
            assert not site.eligible and f"'{leaf}'" in site.reason, (name, site.reason)
    report = dyrep_fx.grow(model)
    assert list(report.changed) == ["conv1"]
    assert max_rel(features(model), ref) <= TOL
    # training with checkpointing still runs through the grown stem
    model.train()
    out = model(X.clone().requires_grad_(True))
    sum(o.sum() for o in out).backward()
    # (block.weight is the kernel the block computes with, a non-leaf; its Parameters are main_weight
    # and the branches')
    assert all(p.grad is not None for p in model.conv1.parameters())
    assert model.conv1.main_weight.grad is not None and model.layer1[0].conv1.weight.grad is not None


def test_transform_keeps_mm_train_override_without_growth():
    model = make("mmdet")
    dyrep_fx.transform(model)
    model.eval()
    assert not model.training
    check_train_override(model, "mmdet")
    assert "train" not in model.__dict__ and model.train.__func__ is mmdet_backbones.ResNet.train
