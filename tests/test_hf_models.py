"""Hugging Face ``transformers`` vision models as a tested family (issue 32 item 3), like the timm zoo.

Each model is built small from its config with random weights (nothing is downloaded), transformed,
grown at every eligible site, trained one SGD step, folded back and loaded with ``strict=True`` into a
freshly built model; float64 throughout. MobileNetV1/V2 pad TF-style by reading ``conv.stride`` /
``kernel_size`` / ``dilation`` in their own forward at run time: the grown block must answer those.
"""

from __future__ import annotations

import pytest
import torch

import dyrep_fx
from dyrep_fx.block import find_blocks

transformers = pytest.importorskip("transformers")

#: Relative error of the logits through growth and through folding (float64); measured up to 4e-15.
TOL = 1e-12


def _configs():
    t = transformers
    return {
        "resnet": lambda: t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)),
        "convnext": lambda: t.ConvNextForImageClassification(t.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=10)),
        "convnextv2": lambda: t.ConvNextV2ForImageClassification(t.ConvNextV2Config(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=10)),
        "regnet": lambda: t.RegNetForImageClassification(t.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=10)),
        "mobilenet_v1": lambda: t.MobileNetV1ForImageClassification(t.MobileNetV1Config(
            depth_multiplier=0.25, num_labels=10, image_size=32)),
        "mobilenet_v2": lambda: t.MobileNetV2ForImageClassification(t.MobileNetV2Config(
            depth_multiplier=0.25, num_labels=10, image_size=32)),
        "efficientnet": lambda: t.EfficientNetForImageClassification(t.EfficientNetConfig(
            width_coefficient=0.25, depth_coefficient=0.1, hidden_dim=320, image_size=32, num_labels=10)),
    }


# over 10 s each on a loaded 2-core machine (mobilenet_v2 45 s, efficientnet 22 s, mobilenet_v1 19 s)
SLOW = {"mobilenet_v1", "mobilenet_v2", "efficientnet"}
MODELS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in _configs()]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _configs()[name]().double()


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", MODELS)
def test_grow_train_fold_strict_load(name):
    model = build(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    dyrep_fx.transform(model, example_inputs=(x,))
    sites = dyrep_fx.sites(model)
    refused = {s.name: s.reason for s in sites if not s.eligible}
    assert not refused, refused
    before = logits(model, x)
    dyrep_fx.grow(model)
    blocks = find_blocks(model, outermost=True)
    assert set(blocks) == {s.name for s in sites}
    assert rel(logits(model, x), before) <= TOL  # growth keeps the function
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = torch.nn.functional.cross_entropy(model(x).logits, torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    trained = logits(model, x)
    assert rel(trained, before) > 1e-6  # the step moved it
    deploy = dyrep_fx.fold(model)
    err = rel(logits(deploy, x), trained)
    assert err <= TOL, err
    fresh = build(name)
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    assert rel(logits(fresh, x), trained) <= TOL


@pytest.mark.parametrize("name", ["resnet", "convnext", "regnet"])
def test_transform_without_example_inputs(name):
    """Their forward branches on ``return_dict`` / ``labels`` and is decorated: the root traces with those
    flags at their defaults; only convs inside untraceable code (the stem, which checks the channel
    count) ask for example inputs, by name."""
    model = build(name)
    dyrep_fx.transform(model)
    sites = dyrep_fx.sites(model)
    eligible = [s for s in sites if s.eligible]
    assert len(eligible) >= len(sites) - 1 and eligible
    for site in sites:
        if not site.eligible:
            assert "pass example_inputs" in site.reason, site.reason
    dyrep_fx.grow(model, [s.name for s in eligible])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert logits(model, x).shape == (2, 10)


def test_mobilenet_reads_conv_geometry_of_the_block():
    """The bug of issue 32: MobileNetV1 pads TF-style from ``conv.stride`` etc. read at run time."""
    model = build("mobilenet_v1")
    x = torch.randn(2, 3, 33, 31, dtype=torch.float64)  # odd sizes: asymmetric TF padding
    dyrep_fx.transform(model, example_inputs=(x,))
    before = logits(model, x)
    strided = [s.name for s in dyrep_fx.sites(model) if s.eligible and s.stride != (1, 1)]
    assert strided
    dyrep_fx.grow(model, strided)  # (the convs whose TF padding depends on the stride)
    assert rel(logits(model, x), before) <= TOL
