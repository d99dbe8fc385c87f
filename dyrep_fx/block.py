"""``RepConv2d``: one conv that can grow re-parameterization branches, prune them, and fold back.

The block takes the place of a single ``nn.Conv2d`` at its module path and keeps that conv's
``weight`` (and ``bias``) Parameter objects as its main kernel, so an un-grown block has the original
state_dict keys and the optimizer keeps its state for them.

Modes (see :mod:`dyrep_fx.branches`):

* ``online`` (default, OREPA): ``W = main_scale * weight + sum_b scale_b * K_b``; one convolution per
  forward (on small feature maps the ``1x1_kxk`` branch runs as two convolutions instead, which is
  cheaper there: :mod:`dyrep_fx.execution`). Growing and cutting keep the function exactly, in train and
  eval mode.
* ``dbb`` (DBB / DyRep): ``y = main_bn(conv(x, weight) + bias) + sum_b branch_b(x)``. Growing and
  cutting keep the function exactly in eval mode; the main BatchNorm is reset to an exact identity
  (``running_var = 1 - eps``) at every change, which the reference code forgets.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import conv_classes, forward_scope, kernels
from .assembly import assemble_kernel
from .branches import Branch, make_branch
from .dbb_ops import pads_with_zeros
from .defaults import INIT_SCALE
from .geometry import ConvGeometry
from .kinds import registry

__all__ = ["RepConv2d", "MODES", "find_blocks"]

MODES = ("online", "dbb")

# Names a block uses for its own state: a wrapped conv's extra parameters, buffers or children cannot
# take them (see RepConv2d.why_not_wrap).
_BLOCK_NAMES = frozenset({"weight", "bias", "geometry", "mode", "init_scale", "branches", "execution", "recompute",
                          "main_scale", "main_bn", "_template"})


class RepConv2d(nn.Module):
    """A conv with re-parameterization branches. Build it from an existing conv with ``RepConv2d(conv)``.

    Args:
        conv: the ``nn.Conv2d`` (or subclass) to take over; its Parameters are reused, not copied.
        mode: ``"online"`` or ``"dbb"``.
        init_scale: initial per-channel scale of new branches (``scale`` or last-BN gamma; DyRep: 0.01).
        recompute: dbb mode: run the branches' 1x1 stages again in backward instead of keeping their output
            maps (see :attr:`recompute`).
    """

    def __init__(self, conv: nn.Conv2d, mode: str = "online", init_scale: float = INIT_SCALE,
                 recompute: bool = False) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"RepConv2d wraps an nn.Conv2d, got {type(conv).__name__}")
        why = self.why_not_wrap(conv)
        if why is not None:
            raise TypeError(f"RepConv2d cannot stand in for this conv exactly: {why}")
        self.geometry = ConvGeometry.from_conv(conv)
        self.mode = mode
        self.init_scale = float(init_scale)
        self.weight = conv.weight
        self.bias = conv.bias
        self.branches = nn.ModuleDict()
        #: Online mode: how a branch that can run apart (``1x1_kxk``) runs (see :mod:`dyrep_fx.execution`);
        #: not saved.
        self.execution = "auto"
        #: dbb mode: run the branches' 1x1 stages again in backward instead of keeping their output maps
        #: (ResNet-18 at 8x224: activation memory -30 % for +7 % step time, see benchmarks/README.md); the
        #: same function and gradients either way. Not saved; set by ``transform(..., recompute=True)``.
        self.recompute = bool(recompute)
        # The original module, kept outside the module tree so that folding can rebuild the very class
        # the user had (e.g. an mmcv Conv2d subclass) without registering its parameters twice.
        self.__dict__["_template"] = conv
        # State a Conv2d subclass adds beside weight and bias (unused by its forward, which is Conv2d's)
        # stays in the module tree under its own names: the state_dict keeps its keys, and folding hands
        # the current values back to the rebuilt conv.
        for key, param in conv._parameters.items():
            if key not in ("weight", "bias"):
                self.register_parameter(key, param)
        for key, buf in conv._buffers.items():
            self.register_buffer(key, buf, persistent=key not in conv._non_persistent_buffers_set)
        for key, child in conv._modules.items():
            self.add_module(key, child)
        # Forward/backward hooks the user put on the conv keep firing on the block that replaces it
        # (the registries are shared, so their handles still remove them).
        for key, value in vars(conv).items():
            if "hook" in key and ("forward" in key or "backward" in key) and isinstance(value, dict):
                setattr(self, key, value)
        self.train(conv.training)

    @staticmethod
    def why_not_wrap(conv: nn.Module) -> str | None:
        """Why a block could not stand in for ``conv`` exactly, or None when it can.

        Refused: a class whose function is not a plain convolution of its weight (see
        :mod:`dyrep_fx.conv_classes`), and extra parameters, buffers or children under a name the block
        uses itself.
        """
        why = conv_classes.why_not_exact(conv)
        if why is not None:
            return why
        extra = [k for d in (conv._parameters, conv._buffers, conv._modules) for k in d if k not in ("weight", "bias")]
        clash = [k for k in extra if k in _BLOCK_NAMES or hasattr(RepConv2d, k)]
        if clash:
            return (f"{type(conv).__name__} holds {clash}, which a re-parameterization block uses as names of "
                    "its own")
        return None

    # -- structure -------------------------------------------------------------------------------
    @property
    def template(self) -> nn.Conv2d:
        """The conv this block took the place of (its class and hyper-parameters; values are the block's)."""
        return self.__dict__["_template"]

    @property
    def grown(self) -> bool:
        """True when the block carries at least one branch."""
        return len(self.branches) > 0

    @property
    def kinds(self) -> list[str]:
        """The kinds of the branches present, in canonical order."""
        return [k for k in registry.kind_names() if k in self.branches]

    def available_kinds(self) -> list[str]:
        """Kinds that apply to this conv and are not present yet."""
        return [k for k in self.geometry.kinds() if k not in self.branches]

    def inner_convs(self) -> dict[str, nn.Module]:
        """The growable convs inside branches, by relative module path (for nested growth)."""
        return {f"branches.{kind}.{rel}": conv for kind, branch in self.branches.items()
                for rel, conv in branch.inner_convs().items()}

    @staticmethod
    def split_inner_path(name: str) -> tuple[str, str] | None:
        """``(block name, branch kind)`` of the inner conv ``name`` (a path :meth:`inner_convs` builds under
        the block's name), or None when ``name`` is no inner conv."""
        block, sep, rest = name.rpartition(".branches.")
        return (block, rest.split(".")[0]) if sep else None

    def structure(self) -> dict[str, Any]:
        """JSON-serialisable description of the branches, nested blocks included."""
        spec: dict[str, Any] = {"kinds": self.kinds}
        nested = {path: m.structure() for path, m in self.inner_convs().items() if isinstance(m, RepConv2d)}
        if nested:
            spec["nested"] = nested
        return spec

    # -- the function ----------------------------------------------------------------------------
    def equivalent(self) -> tuple[Tensor, Tensor | None]:
        """The exact eval-mode kernel and bias of the whole block (nested blocks included)."""
        if not self.grown:
            return self.weight, self.bias
        if self.mode == "online":
            return self._online_kernel(), self.bias
        w_main, b_main = kernels.fuse_bn(self.weight, self.bias, self.main_bn.running_mean,
                                         self.main_bn.running_var, self.main_bn.weight, self.main_bn.bias,
                                         self.main_bn.eps)
        parts = [b.kernel() for b in self.branches.values()]
        return kernels.add_branches([w_main] + [w for w, _ in parts], [b_main] + [b for _, b in parts])

    def _online_kernel(self, skip: tuple[str, ...] = ()) -> Tensor:
        terms = [branch.term() for kind, branch in self.branches.items() if kind not in skip]
        return assemble_kernel(self.weight, self.main_scale, terms)

    def _call_kernel(self, skip: tuple[str, ...] = ()) -> Tensor:
        """The online kernel for this call, assembled once per forward call of the transformed model
        however often the conv is called in it.

        Inside a :class:`~dyrep_fx.forward_scope.ForwardScope` (one forward call of a transformed
        model) and with gradients, the kernel is kept under a key of ``skip``, the autocast mode and
        every parameter's and buffer's version and storage: a conv called several times in the call (a
        head conv shared by the pyramid levels) reuses the same kernel tensor, so its autograd node runs
        once and receives the summed gradient of all calls. The scope ends with the call, so no write
        made between two forward calls of the model (through ``.data`` or not) can be missed. Without
        gradients nothing is kept.
        """
        scope = forward_scope.active_scope()
        if scope is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            # (a compiled graph computes the kernel once per graph anyway: its calls share the inputs)
            return self._online_kernel(skip)
        key = (skip, torch.is_autocast_enabled(),
               tuple((t._version, t.data_ptr()) for t in itertools.chain(self.parameters(), self.buffers())))
        kept = scope.get(self, key)
        if kept is not None:
            return kept
        kernel = self._online_kernel(skip)
        if kernel.requires_grad:  # (a frozen block has nothing to share)
            scope.keep(self, key, kernel)
        return kernel

    def _online_forward(self, x: Tensor) -> Tensor:
        apart = [kind for kind, b in self.branches.items() if b.runs_apart(tuple(x.shape), self.execution)]
        out = self.geometry.conv(x, self._call_kernel(skip=tuple(apart)), self.bias)
        for kind in apart:
            out = out + self.branches[kind](x, None)  # (it pads its intermediate map itself)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if not self.grown:
            return self.geometry.conv(x, self.weight, self.bias)
        if self.mode == "online":
            return self._online_forward(x)
        return self._dbb_forward(x)

    def _dbb_forward(self, x: Tensor) -> Tensor:
        # With zero padding every conv pads inside itself and keeps the unpadded input for backward, which
        # the layer before keeps anyway; a padded copy would be one more input-sized tensor per block.
        # Other padding modes pad once here and share the copy.
        geom = self.geometry
        xp = None if pads_with_zeros(geom) else geom.pad_input(x)
        main = geom.conv(x, self.weight, self.bias) if xp is None else geom.conv_valid(xp, self.weight, self.bias)
        out = self.main_bn(main)
        for branch in self.branches.values():
            out = out + branch(x, xp, self.recompute)
        return out

    # -- growth and pruning ----------------------------------------------------------------------
    @torch.no_grad()
    def grow(self, kinds: Iterable[str] | None = None) -> list[Branch]:
        """Add branches of ``kinds`` (default: every available kind) without changing the function.

        Returns the new branch modules (in dbb mode their BatchNorms still hold fresh statistics;
        calibrate them on data, then call :meth:`rebalance` with the kernel taken before growth).
        """
        kinds = self.available_kinds() if kinds is None else list(kinds)
        self._check_kinds(kinds, must_exist=False)
        if not kinds:
            return []
        target = self._detached_equivalent()
        if not self.grown:
            self._add_main_scale()
        new = []
        for kind in registry.kind_names():
            if kind in kinds:
                branch = make_branch(kind, self.geometry, self.mode, self.init_scale, self.weight)
                if self.mode == "online":
                    self._start_at_init_share(branch, target[0])
                branch.train(self.training)
                self.branches[kind] = branch
                new.append(branch)
        self.rebalance(*target)
        return new

    @torch.no_grad()
    def cut(self, kinds: Iterable[str]) -> None:
        """Remove branches of ``kinds``, absorbing them exactly into the main kernel.

        Surviving branches, nested blocks included, keep their parameters and statistics.
        """
        kinds = list(kinds)
        self._check_kinds(kinds, must_exist=True)
        if not kinds:
            return
        target = self._detached_equivalent()
        for kind in kinds:
            del self.branches[kind]
        if self.grown:
            self.rebalance(*target)
            return
        self._remove_main_scale()
        self.weight.copy_(target[0])
        if target[1] is not None:
            self.ensure_bias()
            self.bias.copy_(target[1])

    @torch.no_grad()
    def rebalance(self, weight: Tensor, bias: Tensor | None) -> None:
        """Set the main kernel so that the block's eval-mode equivalent is ``(weight, bias)``.

        The main scale (online) or main BatchNorm (dbb) is reset to an exact identity and the
        branches' current kernels are subtracted: ``W_main = W - sum_b K_b``.
        """
        parts = [b.kernel() for b in self.branches.values()]
        w_rest, b_rest = kernels.add_branches([weight] + [-w for w, _ in parts],
                                              [bias] + [None if b is None else -b for _, b in parts])
        if self.grown:
            self._reset_main_scale()
        self.weight.copy_(w_rest)
        if b_rest is not None:
            self.ensure_bias()
            self.bias.copy_(b_rest)
        elif self.bias is not None:
            self.bias.zero_()

    def importance(self) -> dict[str, float]:
        """Each branch's importance relative to the main branch (DyRep's Dep criterion compares it to 0.1).

        * dbb mode (the reference's): ``mean|gamma_b| / mean|gamma_main|`` of the branches' last BatchNorms.
          A BatchNorm output has std ``|gamma|``, so this is the branch's output scale over the main one's.
        * online mode: the branch's share of the block's kernel, ``mean_o ||K_b[o]|| / mean_o ||W[o]||``
          (Frobenius norms per output channel of the branch's scaled kernel and of the whole effective
          kernel ``W``). A scale alone would not do: the branch kernel's own norm is free and differs by
          kind, so the same scale would mean different contributions.

        In both modes a new branch starts at ``init_scale`` exactly (online: its scale is set so).
        """
        if not self.grown:
            return {}
        if self.mode == "dbb":
            main = self._main_gamma().detach().abs().mean()
            return {kind: float(b.gamma().detach().abs().mean() / main) for kind, b in self.branches.items()}
        with torch.no_grad():
            whole = kernels.channel_norms(self._online_kernel()).mean()
            return {kind: float(kernels.channel_norms(b.kernel()[0]).mean() / whole)
                    for kind, b in self.branches.items()}

    # -- folding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """A conv of the original class and hyper-parameters that computes this block (eval mode).

        It has a bias exactly when the original conv had one or the block's equivalent needs one
        (dbb mode on a bias-free conv); folding passes then push that bias into the next BatchNorm.
        """
        weight, bias = self.equivalent()
        template = self._template
        conv = copy.copy(template)
        # The copy shares the template's containers: give it its own, in the original order, holding
        # copies of the block's current values (extra state a subclass added included; see __init__).
        own = {"weight": nn.Parameter(weight.detach().clone(), requires_grad=self.weight.requires_grad),
               "bias": None if bias is None else nn.Parameter(bias.detach().clone())}
        conv._parameters = {k: own[k] if k in own else _copy_parameter(self._parameters[k])
                            for k in template._parameters}
        conv._parameters.setdefault("bias", own["bias"])
        conv._buffers = {k: None if self._buffers[k] is None else self._buffers[k].detach().clone()
                         for k in template._buffers}
        conv._non_persistent_buffers_set = set(template._non_persistent_buffers_set)
        conv._modules = {k: copy.deepcopy(self._modules[k]) for k in template._modules}
        # Hook registries are per module: the copy gets its own (holding the original's hooks).
        for key, value in list(vars(conv).items()):
            if "hook" in key and isinstance(value, dict):
                setattr(conv, key, type(value)(value))
        conv.train(self.training)
        return conv

    # -- helpers ---------------------------------------------------------------------------------
    def _check_kinds(self, kinds: list[str], must_exist: bool) -> None:
        for kind in kinds:
            if kind not in registry.kind_names():
                raise ValueError(f"unknown branch kind {kind!r}; kinds are {list(registry.kind_names())}")
            if must_exist and kind not in self.branches:
                raise ValueError(f"cannot cut {kind!r}: the block has {self.kinds}")
            if not must_exist:
                why = registry.get_kind(kind).applies(self.geometry)
                if why is not None:
                    raise ValueError(f"branch {kind!r} does not apply to this conv: {why}")
                if kind in self.branches:
                    raise ValueError(f"branch {kind!r} is already present")

    def _detached_equivalent(self) -> tuple[Tensor, Tensor | None]:
        w, b = self.equivalent()
        return w.detach().clone(), None if b is None else b.detach().clone()

    def _start_at_init_share(self, branch: Branch, kernel: Tensor) -> None:
        """Scale a new online branch so that its kernel is ``init_scale`` of ``kernel`` (the block's, norm
        per output channel averaged): every kind then starts at the same importance, as in dbb mode."""
        whole = kernels.channel_norms(kernel).mean()
        raw = kernels.channel_norms(branch.raw_kernel()).mean()
        if whole > 0 and raw > 0:
            branch.scale.fill_(float(self.init_scale * whole / raw))

    def _main_gamma(self) -> Tensor:
        return self.main_scale if self.mode == "online" else self.main_bn.weight

    def _add_main_scale(self) -> None:
        like = self.weight
        if self.mode == "online":
            self.main_scale = nn.Parameter(torch.ones(self.geometry.out_channels, device=like.device,
                                                      dtype=like.dtype))
        else:
            self.main_bn = nn.BatchNorm2d(self.geometry.out_channels, device=like.device, dtype=like.dtype)
            self.main_bn.train(self.training)
            self.ensure_bias()

    def _reset_main_scale(self) -> None:
        if self.mode == "online":
            self.main_scale.fill_(1.0)
        else:
            bn = self.main_bn
            bn.reset_parameters()
            # sqrt(var + eps) == 1 exactly (to rounding): the main BN is then the identity in eval mode.
            bn.running_var.fill_(1.0 - bn.eps)

    def _remove_main_scale(self) -> None:
        if self.mode == "online":
            del self.main_scale
        else:
            del self.main_bn

    def ensure_bias(self) -> None:
        """Give the block a zero bias Parameter if it has none (dbb mode and restored structures need one)."""
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.geometry.out_channels, device=self.weight.device,
                                                 dtype=self.weight.dtype))

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
                f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, mode={self.mode!r}, "
                f"kinds={self.kinds}")


def _copy_parameter(param: nn.Parameter | None) -> nn.Parameter | None:
    return None if param is None else nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)


def find_blocks(model: nn.Module, outermost: bool = False) -> dict[str, RepConv2d]:
    """Every :class:`RepConv2d` in ``model`` by qualified name; ``outermost`` skips nested ones."""
    found: dict[str, RepConv2d] = {}
    for name, m in model.named_modules():
        if isinstance(m, RepConv2d) and not (outermost and any(name.startswith(n + ".") for n in found)):
            found[name] = m
    return found
