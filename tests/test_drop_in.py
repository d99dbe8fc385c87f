"""A grown block is a drop-in for the conv it replaced (issue 32 item 1).

The user's own code keeps running against the block where a ``Conv2d`` used to be, so every attribute
it read on the conv reads the same on the block: the conv's geometry (read-only), a subclass's own
attributes, and ``weight`` / ``bias`` as the kernel the block computes with (or, in dbb mode in train
mode, where no single kernel computes it, a loud refusal). Checked by value in float64 on every kind,
both modes and nested blocks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.numerics import rel_err
from helpers.strategies import shuffle_state
from torch import nn
from torch.nn.utils import parametrize

import dyrep_fx
from dyrep_fx.block import CONV_ATTRIBUTES, NoSingleKernelError, RepConv2d

TOL = 1e-12
MODES = ("online", "dbb")

# Geometries that between them admit every branch kind: a dense 3x3 (DBB / OREPA kinds, identity), a
# widening strided non-square one with reflect padding, and a depthwise 7x7 (the large-kernel kinds).
CONVS = {
    "dense3x3": lambda: nn.Conv2d(6, 6, 3, padding=1),
    "widening": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "strided_reflect": lambda: nn.Conv2d(4, 6, (3, 5), stride=2, padding=(1, 2), padding_mode="reflect", bias=False),
    "depthwise7x7": lambda: nn.Conv2d(6, 6, 7, padding="same", groups=6, bias=False),
    "dilated_same": lambda: nn.Conv2d(4, 4, 3, dilation=2, padding="same"),
}


def make_conv(name: str) -> nn.Conv2d:
    torch.manual_seed(0)
    return CONVS[name]().double()


def every_kind() -> list[tuple[str, str]]:
    """``(conv, kind)`` for every kind, each on the first geometry above it applies to."""
    pairs: dict[str, str] = {}
    for name in CONVS:
        for kind in RepConv2d(make_conv(name)).available_kinds():
            pairs.setdefault(kind, name)
    return [(conv, kind) for kind, conv in pairs.items()]


def conv_with(block: RepConv2d, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """What the conv the block replaced computes with ``weight`` and ``bias`` (its own padding code)."""
    return block.template._conv_forward(x, weight, bias)


def grown(conv_name: str, mode: str, kinds: list[str], nested: bool = False) -> RepConv2d:
    """A block grown with ``kinds`` (and a grown inner block when ``nested``), every value moved off its
    initial one so that no branch is zero and the main kernel differs from the block's."""
    block = RepConv2d(make_conv(conv_name), mode)
    block.grow(kinds)
    if nested:
        branch = block.branches["1x1_kxk"]
        branch.conv2 = RepConv2d(branch.conv2, mode)
        branch.conv2.grow()
    torch.manual_seed(1)
    shuffle_state(block)
    return block


def x_for(block: RepConv2d) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(2, block.in_channels, 11, 13, dtype=torch.float64)


# --------------------------------------------------------------------------------- conv attributes
@pytest.mark.parametrize("conv_name", list(CONVS))
@pytest.mark.parametrize("mode", MODES)
def test_conv_attributes_read_as_the_conv_had(conv_name, mode):
    conv = make_conv(conv_name)
    expected = {attr: copy.copy(getattr(conv, attr)) for attr in CONV_ATTRIBUTES}
    block = RepConv2d(conv, mode)
    for stage in ("ungrown", "grown"):
        for attr, value in expected.items():
            got = getattr(block, attr)
            # the conv's own values and types ('same' stays a string, tuples stay tuples)
            assert got == value and type(got) is type(value), (stage, attr, got, value)
        block.grow()


@pytest.mark.parametrize("attr", CONV_ATTRIBUTES)
def test_geometry_is_read_only(attr):
    block = RepConv2d(make_conv("dense3x3"))
    block.grow(["1x1"])
    before = getattr(block, attr)
    with pytest.raises(AttributeError, match=f"{attr} of a RepConv2d is read-only.*fold"):
        setattr(block, attr, 2)
    assert getattr(block, attr) == before and getattr(block.template, attr) == before


class ScaledConv(nn.Conv2d):
    """A user's subclass with attributes of its own (as mmcv's and HF's convs carry)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.note = "stem"
        self.tf_padding = True


def test_subclass_attributes_read_and_written_through():
    conv = ScaledConv(4, 4, 3, padding=1).double()
    block = RepConv2d(conv)
    block.grow(["1x1"])
    assert (block.note, block.tf_padding) == ("stem", True)
    block.note = "changed"
    assert block.note == "changed"
    # the value lives where folding reads it: the folded conv of the user's class carries it
    folded = block.to_conv()
    assert type(folded) is ScaledConv and folded.note == "changed" and folded.tf_padding is True
    with pytest.raises(AttributeError, match="no_such_attribute"):
        block.no_such_attribute  # noqa: B018


# --------------------------------------------------------------------------------- weight and bias
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conv_name,kind", every_kind())
def test_weight_is_the_kernel_the_block_computes(mode, conv_name, kind):
    block = grown(conv_name, mode, [kind]).eval()
    x = x_for(block)
    with torch.no_grad():
        out = block(x)
        err = rel_err(conv_with(block, block.weight, block.bias, x), out)
        assert err <= TOL, err
        # (the main kernel alone is not it: a block serving main_weight as weight fails above)
        assert rel_err(conv_with(block, block.main_weight, block.main_bias, x), out) > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_weight_of_nested_blocks(mode):
    block = grown("dense3x3", mode, ["1x1", "1x1_kxk", "identity"], nested=True).eval()
    inner = block.branches["1x1_kxk"].conv2
    assert isinstance(inner, RepConv2d) and inner.grown
    x = x_for(block)
    with torch.no_grad():
        assert rel_err(conv_with(block, block.weight, block.bias, x), block(x)) <= TOL
        # the inner block too: it computes its kxk stage on the padded intermediate map
        z = torch.randn(2, inner.in_channels, 9, 9, dtype=torch.float64)
        assert rel_err(conv_with(inner, inner.weight, inner.bias, z), inner(z)) <= TOL


@pytest.mark.parametrize("conv_name", list(CONVS))
def test_online_weight_in_train_mode_with_its_gradient(conv_name):
    block = grown(conv_name, "online", None, nested=False).train()
    x = x_for(block)
    params = [p for p in block.parameters() if p.requires_grad]
    direct = torch.autograd.grad((block(x) ** 2).sum(), params)
    through_weight = torch.autograd.grad((conv_with(block, block.weight, block.bias, x) ** 2).sum(), params)
    for name, a, b in zip([n for n, p in block.named_parameters() if p.requires_grad], direct, through_weight):
        assert rel_err(b, a) <= TOL, name
        assert a.abs().max() > 0, name  # every parameter takes part


@pytest.mark.parametrize("mode", MODES)
def test_ungrown_block_serves_the_conv_parameters_themselves(mode):
    conv = make_conv("dense3x3")
    block = RepConv2d(conv, mode).train()
    assert block.weight is conv.weight and block.bias is conv.bias
    assert list(block.state_dict()) == ["weight", "bias"]
    new = nn.Parameter(torch.randn_like(conv.weight))
    block.weight = new  # as on a conv: the kernel is replaced
    assert block.weight is new and block.main_weight is new


def test_dbb_weight_refused_in_train_mode():
    block = grown("dense3x3", "dbb", ["1x1", "1x1_avg"]).train()
    for attr in ("weight", "bias"):
        with pytest.raises(NoSingleKernelError, match="batch statistics.*eval mode.*main_weight.*fold"):
            getattr(block, attr)
        assert not hasattr(block, attr)
        assert getattr(block, attr, "absent") == "absent"  # never the main kernel Parameter
    # one BatchNorm left in train mode is enough to refuse: the block computes with its batch statistics
    block.eval()
    block.branches["1x1_avg"].bn.train()
    with pytest.raises(NoSingleKernelError, match="branches.1x1_avg.bn"):
        block.weight  # noqa: B018
    block.eval()
    assert block.weight.shape == block.main_weight.shape


@pytest.mark.parametrize("mode", MODES)
def test_grown_weight_cannot_be_set(mode):
    block = grown("dense3x3", mode, ["1x1"]).eval()
    main = block.main_weight
    with pytest.raises(AttributeError, match="cannot set weight of a RepConv2d grown with.*main_weight"):
        block.weight = nn.Parameter(torch.zeros_like(main))
    assert block.main_weight is main


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_keys_hold_the_main_kernel(mode):
    block = grown("dense3x3", mode, ["1x1"]).eval()
    state = block.state_dict()
    assert torch.equal(state["weight"], block.main_weight) and torch.equal(state["bias"], block.main_bias)
    fresh = RepConv2d(make_conv("dense3x3"), mode)
    fresh.grow(["1x1"])
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    x = x_for(block)
    with torch.no_grad():
        assert torch.equal(fresh(x), block(x))


class Doubled(nn.Module):
    """A parametrization that changes the value: ``V -> 2 V`` (no right_inverse)."""

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return 2 * v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grow_first", [False, True], ids=["ungrown", "grown"])
def test_parametrized_main_kernel(mode, grow_first):
    """``register_parametrization(block, "weight", p)`` parametrizes the main kernel, as on a conv (the
    weight-normalised ablation, benchmarks/branch_norm.py, does it on grown blocks): the main Parameter
    becomes ``original``, ``main_weight`` is the parametrized value and the block computes with it,
    ``weight`` stays the block's kernel, the fold is exact, and removing the parametrization leaves the
    parametrized value in the same Parameter."""
    block = (grown("dense3x3", mode, ["1x1", "identity"]) if grow_first else RepConv2d(make_conv("dense3x3"), mode))
    block.eval()
    main = block.main_weight
    keys = list(block.state_dict())
    reference = copy.deepcopy(block)  # the same block, its main kernel doubled by hand
    with torch.no_grad():
        reference.main_weight.mul_(2)
    x = x_for(block)
    parametrize.register_parametrization(block, "weight", Doubled())

    assert block.parametrizations.weight.original is main  # the main Parameter, not the block's kernel
    assert torch.equal(block.main_weight, 2 * main) and block.main_weight.grad_fn is not None
    assert isinstance(block, RepConv2d) and parametrize.type_before_parametrizations(block) is RepConv2d
    # state_dict keys as torch's parametrize gives them (an ungrown block: the very keys of a conv)
    assert set(block.state_dict()) == set(keys) - {"weight"} | {"parametrizations.weight.original"}
    if not grow_first:
        conv = make_conv("dense3x3")
        parametrize.register_parametrization(conv, "weight", Doubled())
        assert list(block.state_dict()) == list(conv.state_dict())
    with torch.no_grad():
        out = block(x)
        assert rel_err(out, reference(x)) <= TOL
        assert rel_err(conv_with(block, block.weight, block.bias, x), out) <= TOL  # weight: the block's kernel
        if grow_first:
            assert rel_err(conv_with(block, block.main_weight, block.main_bias, x), out) > 1e-3
        assert rel_err(block.to_conv()(x), out) <= TOL  # the fold reads the parametrized main kernel
    if mode == "online" or not grow_first:  # (a grown dbb block has no kernel in train mode)
        block.train()
        (conv_with(block, block.weight, block.bias, x) ** 2).sum().backward()
        assert main.grad is not None and main.grad.abs().max() > 0  # into the main Parameter
        block.eval()
    if grow_first:  # growing and cutting write the main kernel, which the parametrization computes
        with pytest.raises(RuntimeError, match="parametrized.*remove the parametrization first"):
            block.cut(["1x1"])
        assert block.kinds == ["1x1", "identity"]

    parametrize.remove_parametrizations(block, "weight")  # leave_parametrized: 2 * main, in main itself
    assert type(block) is RepConv2d and block.main_weight is main and set(block.state_dict()) == set(keys)
    with torch.no_grad():
        assert rel_err(block(x), out) <= TOL


# --------------------------------------------------------------------------- refused at sites() time
class PaddingConv(nn.Conv2d):
    """A user's conv with a method of its own, called by the code around it."""

    def tf_pad(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (1, 1, 1, 1))


class ReadsConv(nn.Module):
    """Code around a conv that reads it at run time, as MobileNet's TF padding does (``how`` says what)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = PaddingConv(4, 4, 3, stride=2)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if self.how == "geometry":  # TF "same" padding from the conv's attributes
            k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
            total = max((-(-x.shape[-1] // s) - 1) * s + (k - 1) * d + 1 - x.shape[-1], 0)
            x = nn.functional.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
            y = self.conv(x)
        elif self.how == "method":  # a method of the conv's class, which a block does not have
            y = self.conv(self.conv.tf_pad(x))
        else:  # the kernel's dtype, as some Hugging Face embeddings do
            y = self.conv(x.to(self.conv.weight.dtype))
        return self.other(y)


def reads_conv(how: str, mode: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ReadsConv(how).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    dyrep_fx.transform(model, example_inputs=(x,), mode=mode)
    return model, x


@pytest.mark.parametrize("mode", MODES)
def test_reading_conv_geometry_at_run_time_grows(mode):
    model, x = reads_conv("geometry", mode)
    site = next(s for s in dyrep_fx.sites(model) if s.name == "conv")
    assert site.eligible, site.reason
    model.eval()
    with torch.no_grad():
        before = model(x)
        dyrep_fx.grow(model, ["conv"])
        assert rel_err(model(x), before) <= TOL


@pytest.mark.parametrize("mode", MODES)
def test_reading_what_a_block_lacks_is_refused_at_sites(mode):
    model, x = reads_conv("method", mode)
    sites = {s.name: s for s in dyrep_fx.sites(model)}
    assert not sites["conv"].eligible
    assert "reads ['tf_pad'] of it, which a RepConv2d standing in for it does not have" in sites["conv"].reason
    assert sites["other"].eligible, sites["other"].reason  # read by nothing but its own forward


def test_reading_the_kernel_is_refused_in_dbb_mode():
    model, _ = reads_conv("dtype", "dbb")
    reason = next(s.reason for s in dyrep_fx.sites(model) if s.name == "conv")
    assert reason is not None and "weight" in reason


def test_watch_leaves_conv_classes_as_they_were():
    reads_conv("geometry", "online")
    assert "__getattribute__" not in vars(nn.Conv2d)
