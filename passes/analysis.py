"""Analysis pass: every conv site of a traced model, its geometry, and whether it can grow.

A site is a conv-like module. It is eligible when it is an ``nn.Conv2d`` (subclasses that compute a
plain convolution of their weight: one overriding ``forward`` or ``_conv_forward`` is refused unless
:mod:`dyrep_fx.conv_classes` knows its function exactly)
called at least once (inside code torch.fx cannot trace: counted at run time on example inputs),
with a trainable, unparametrized weight used by nothing but its own forward, at a
nesting depth below :data:`MAX_DEPTH`; in dbb mode a conv without bias must feed only a BatchNorm
(which absorbs the bias the branches bring when the model is folded). A conv called several times
per forward (a head conv shared by the pyramid levels) grows as one block that serves every call; in
dbb mode its branches' BatchNorms are shared by the calls as the conv is (each call normalises with its
own batch statistics in training; calibration averages the statistics over calls). Every other site
carries the reason it is not eligible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..block import RepConv2d, main_parameters
from ..geometry import ConvGeometry
from ..kinds import applicable_kinds
from ..tracing import ConvUse, TracedModel, conv_modules
from .base import PassReport

__all__ = ["Site", "MAX_DEPTH", "analyse", "run"]

#: Depth 0: convs of the model; depth 1: kxk convs inside a grown branch. Deeper ones do not grow.
MAX_DEPTH = 2


@dataclass
class Site:
    """One conv site: what it is, how the graph uses it, and whether (or why not) it can grow."""

    name: str
    module_type: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    depth: int = 0
    calls: int | None = None
    next_bn: str | None = None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    eligible: bool = False
    reason: str | None = None
    kinds: list[str] = field(default_factory=list)  # kinds that apply and are not present yet
    grown: list[str] = field(default_factory=list)  # kinds present

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of this site."""
        return asdict(self)


def _describe(name: str, module: nn.Module, depth: int) -> Site:
    conv = module.template if isinstance(module, RepConv2d) else module
    return Site(
        name=name, module_type=type(module).__name__, in_channels=conv.in_channels,
        out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
        padding=conv.padding, dilation=tuple(conv.dilation), groups=conv.groups,
        bias=main_parameters(module)[1] is not None, depth=depth,
    )


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> the modules holding it (several when weights are tied)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None and name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
    return owners


def _shared_with(site: Site, module: nn.Module, owners: dict[int, list[str]]) -> str | None:
    for p in main_parameters(module):
        if p is None:
            continue
        others = [o for o in owners.get(id(p), []) if o != site.name and not o.startswith(site.name + ".")]
        if others:
            return others[0]
    return None


def _why_not_called(name: str, use: ConvUse | None, traced: TracedModel) -> str | None:
    """Why the calls of a top-level conv are unknown or unfit for growth, or None.

    Convs inside code torch.fx cannot trace are sites when the model ran on example inputs: forward
    hooks counted their calls, and a watch on every op saw whether anything but the conv's own forward
    took its weight (which growing would change).
    """
    counted = use is not None and use.runtime_calls is not None
    leaf = traced.leaf_containing(name)
    if leaf is not None and not counted:
        return (f"inside {leaf!r}, which torch.fx could not trace ({traced.untraceable[leaf]}); pass "
                "example_inputs so that its calls can be counted at run time")
    if not counted and not traced.root_traced:
        return (f"the model's forward could not be traced ({traced.untraceable.get('')}); "
                "pass example_inputs so that calls can be counted at run time")
    if use is not None and use.weight_used_outside is not None:
        return f"{use.weight_used_outside}; growing it would change what that computes"
    if use is None or (use.calls == 0 and not counted):
        return "never called in the traced graph"
    if counted and use.runtime_calls == 0:
        return "never called when the model ran on the example inputs"
    return None


def _why_not_drop_in(use: ConvUse | None, mode: str) -> str | None:
    """Why a block could not stand in for the conv to the code around it, or None.

    The model's own code keeps running against the block: an attribute it read on the conv (outside the
    conv's forward, seen while tracing or running) that a block lacks would fail at the first forward
    after growth, and ``weight`` / ``bias`` have no single value in a grown dbb-mode block in train mode.
    """
    reads = getattr(use, "attributes_read_outside", None) or []
    missing = [a for a in reads if a not in ("weight", "bias")]
    if missing:
        return (f"code outside its forward reads {missing} of it, which a RepConv2d standing in for it does "
                "not have")
    kernel = [a for a in reads if a in ("weight", "bias")]
    if kernel and mode == "dbb":
        return (f"code outside its forward reads its {kernel[0]}, which a grown dbb-mode block has no single "
                "value of in train mode (its BatchNorms normalise with batch statistics); use mode='online'")
    return None


def _why_not(site: Site, module: nn.Module, use: ConvUse | None, traced: TracedModel, mode: str,
             owners: dict[int, list[str]] | None = None) -> str | None:
    """The first reason the site cannot grow, or None."""
    if not isinstance(module, (nn.Conv2d, RepConv2d)):
        return f"{type(module).__name__} is not a Conv2d (only 2-D convolutions are re-parameterized)"
    if not isinstance(module, RepConv2d):
        why = RepConv2d.why_not_wrap(module)
        if why is not None:
            return why
    if site.depth >= MAX_DEPTH:
        return f"nested {site.depth} deep; growth stops at depth {MAX_DEPTH - 1}"
    if site.depth == 0:
        why = _why_not_called(site.name, use, traced) or _why_not_drop_in(use, mode)
        if why is not None:
            return why
    shared = _shared_with(site, module, owners or {})
    if shared is not None:
        return f"its weight is shared with {shared!r} (tied weights); growing it would change that module too"
    if not main_parameters(module)[0].requires_grad:
        return "frozen (weight.requires_grad is False, e.g. mmdet frozen_stages)"
    if parametrize.is_parametrized(module):
        return "its weight is parametrized (torch.nn.utils.parametrize); remove the parametrization first"
    if mode == "dbb" and site.depth == 0 and main_parameters(module)[1] is None and site.next_bn is None:
        return ("dbb mode gives the conv a bias, and its output does not feed only a BatchNorm that could "
                "absorb it at fold time; use mode='online'")
    return None


def analyse(traced: TracedModel, model: nn.Module, mode: str = "online") -> list[Site]:
    """Every conv site of ``model`` (nested sites inside grown blocks included), in module order."""
    sites: list[Site] = []
    owners = _owners(model)

    def visit(name: str, module: nn.Module, depth: int) -> None:
        site = _describe(name, module, depth)
        use = traced.convs.get(name) if depth == 0 else None
        if use is not None:
            site.calls = use.runtime_calls if use.runtime_calls is not None else use.calls
            site.next_bn, site.input_shape, site.output_shape = use.next_bn, use.input_shape, use.output_shape
        elif depth > 0:
            site.calls = 1
        site.reason = _why_not(site, module, use, traced, mode, owners)
        site.eligible = site.reason is None
        if isinstance(module, RepConv2d):
            site.grown = module.kinds
            site.kinds = module.available_kinds() if site.eligible else []
        elif site.eligible:
            site.kinds = applicable_kinds(ConvGeometry.from_conv(module))
        sites.append(site)
        if isinstance(module, RepConv2d):
            for rel, inner in module.inner_convs().items():
                visit(f"{name}.{rel}", inner, depth + 1)

    for name, module in conv_modules(model).items():
        visit(name, module, 0)
    return sites


def run(traced: TracedModel, model: nn.Module, mode: str = "online") -> PassReport:
    """The analysis as a pass: eligible sites in ``details['eligible']`` (nothing is changed), others skipped."""
    report = PassReport("analysis")
    sites = analyse(traced, model, mode)
    for site in sites:
        if site.eligible:
            report.details.setdefault("eligible", []).append(site.name)
        else:
            report.skipped[site.name] = site.reason or ""
    report.details["sites"] = sites
    report.details["untraceable"] = dict(traced.untraceable)
    report.details["graph_differs_in_eval"] = traced.graph_differs_in_eval
    return report
