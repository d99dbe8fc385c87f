"""``RepConv2d``: one conv that can grow re-parameterization branches, prune them, and fold back.

The block takes the place of a single ``nn.Conv2d`` at its module path and keeps that conv's
``weight`` (and ``bias``) Parameter objects as its main kernel (:attr:`RepConv2d.main_weight`,
:attr:`RepConv2d.main_bias`, registered under the conv's names), so an un-grown block has the original
state_dict keys and the optimizer keeps its state for them.

It is a drop-in for the conv to the user's code: the conv's attributes (``stride``, ``kernel_size``, ...,
and a subclass's own) read as they did, read-only where they define the function, and ``weight`` /
``bias`` are the kernel the block computes with (:meth:`RepConv2d.kernel`), not the main kernel.

The main kernel can be parametrized as a conv's weight is:
``torch.nn.utils.parametrize.register_parametrization(block, "weight", p)`` parametrizes the tensor registered
under ``weight`` (the main kernel; its Parameter moves to ``parametrizations.weight.original``, the state_dict
keys are the ones torch gives), :attr:`RepConv2d.main_weight` is then the parametrized value, and
``block.weight`` stays the kernel the block computes with (see :class:`_BlockType`).

Modes (see :mod:`dyrep_fx.kinds.branch`):

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
import inspect
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import conv_classes, forward_scope, kernels
from .assembly import assemble_kernel
from .dbb_ops import pads_with_zeros
from .defaults import INIT_SCALE
from .geometry import ConvGeometry
from .kinds import applicable_kinds, registry
from .kinds.branch import Branch

__all__ = ["RepConv2d", "MODES", "find_blocks", "main_parameters", "NoSingleKernelError", "CONV_ATTRIBUTES"]

MODES = ("online", "dbb")

# Names a block uses for its own state: a wrapped conv's extra parameters, buffers or children cannot
# take them (see RepConv2d.why_not_wrap).
_BLOCK_NAMES = frozenset({"weight", "bias", "geometry", "mode", "init_scale", "branches", "execution", "recompute",
                          "main_scale", "main_bn", "_template"})

#: The attributes every ``nn.Conv2d`` offers that define its function: a block answers them with the values
#: of the conv it took the place of, and refuses to set them.
CONV_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                   "padding_mode", "transposed", "output_padding")
# Instance attributes of every Conv2d (the above, hook registries, ...): what a subclass adds is the rest.
_CONV2D_INSTANCE_NAMES = frozenset(vars(nn.Conv2d(1, 1, 1, device="meta")))
_MODULE_INSTANCE_NAMES = frozenset(vars(nn.Module()))

# torch's parametrization machinery: it addresses a module's registered tensors by attribute name.
_PARAMETRIZE_MODULES = frozenset({"torch.nn.utils.parametrize", "torch.nn.utils.parametrizations"})
_MAIN_NAMES = ("weight", "bias")


def _parametrized_slot(name: str) -> str:
    """Where a block's class keeps the property torch's parametrize made for the main ``name``."""
    return f"_parametrized_{name}"


class NoSingleKernelError(AttributeError):
    """A grown dbb-mode block read as ``weight`` / ``bias`` while a BatchNorm of it normalises with batch
    statistics: no single kernel computes the block then.

    An ``AttributeError``, so ``hasattr(block, "weight")`` / ``getattr(block, "weight", None)`` say the
    block has no kernel now, and a direct read says why.
    """


def _conv_attribute(name: str) -> property:
    def get(self: RepConv2d) -> Any:
        return getattr(self.template, name)

    return property(get, doc=f"The ``{name}`` of the conv this block took the place of (read-only).")


class _BlockType(type):
    """The metaclass of :class:`RepConv2d`: a parametrized main kernel leaves ``weight`` / ``bias`` the
    kernel the block computes with.

    ``register_parametrization(block, "weight", p)`` gives the block a class of its own (a subclass) and sets
    on it a ``weight`` property returning the parametrized tensor, which would shadow
    :attr:`RepConv2d.weight` and serve the main kernel as the block's kernel. That property is kept under
    ``_parametrized_weight`` instead (removing the parametrization deletes it there), and the block reads it
    as its main kernel (:attr:`RepConv2d.main_weight`).
    """

    def __setattr__(cls, name: str, value: Any) -> None:
        if name in _MAIN_NAMES and isinstance(value, property) \
                and getattr(value.fget, "__module__", None) in _PARAMETRIZE_MODULES:
            name = _parametrized_slot(name)
        super().__setattr__(name, value)

    def __delattr__(cls, name: str) -> None:
        if name in _MAIN_NAMES and name not in cls.__dict__ and _parametrized_slot(name) in cls.__dict__:
            name = _parametrized_slot(name)
        super().__delattr__(name)


class RepConv2d(nn.Module, metaclass=_BlockType):
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
        # The conv's own Parameters are the main kernel, under the conv's names (the state_dict keys stay);
        # ``weight`` / ``bias`` read on the block are the kernel it computes with (properties below).
        self._parameters["weight"] = conv.weight
        self._parameters["bias"] = conv.bias
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

    # -- drop-in for the conv --------------------------------------------------------------------
    in_channels = _conv_attribute("in_channels")
    out_channels = _conv_attribute("out_channels")
    kernel_size = _conv_attribute("kernel_size")
    stride = _conv_attribute("stride")
    padding = _conv_attribute("padding")
    dilation = _conv_attribute("dilation")
    groups = _conv_attribute("groups")
    padding_mode = _conv_attribute("padding_mode")
    transposed = _conv_attribute("transposed")
    output_padding = _conv_attribute("output_padding")

    @property
    def main_weight(self) -> nn.Parameter | Tensor:
        """The main kernel Parameter: the conv's own ``weight`` object (state_dict key ``weight``); where
        ``torch.nn.utils.parametrize`` parametrizes ``weight``, the parametrized main kernel (its Parameter is
        ``parametrizations.weight.original``)."""
        return self._main("weight")

    @property
    def main_bias(self) -> nn.Parameter | Tensor | None:
        """The main bias Parameter (the conv's own ``bias``, or one dbb mode added), or None; where ``bias``
        is parametrized, the parametrized value."""
        return self._main("bias")

    def _main(self, name: str) -> Tensor | None:
        if name in self._parameters:
            return self._parameters[name]
        parametrized = getattr(type(self), _parametrized_slot(name), None)
        if parametrized is not None:
            return parametrized.__get__(self)  # (torch's getter: parametrize.cached() applies)
        # (while torch's parametrize moves the Parameter out, before its property is in place)
        raise AttributeError(f"this RepConv2d holds no main {name} now")

    @property
    def weight(self) -> Tensor:
        """The kernel the block computes with, as the conv's ``weight`` would be: see :meth:`kernel`."""
        return self._serve("weight", inspect.currentframe())

    @property
    def bias(self) -> Tensor | None:
        """The bias the block computes with, as the conv's ``bias`` would be: see :meth:`kernel`."""
        return self._serve("bias", inspect.currentframe())

    def _serve(self, name: str, caller: Any) -> Tensor | None:
        """``weight`` / ``bias`` read from the attribute's frame ``caller`` (its caller reads): the block's kernel, except to torch's
        parametrize, which addresses the tensor registered under the name (the main kernel: it takes that
        Parameter as ``original`` and reads the parametrized value back under the name)."""
        caller = None if caller is None else caller.f_back  # the frame of whoever read the attribute
        if (not torch.compiler.is_compiling() and caller is not None
                and caller.f_globals.get("__name__") in _PARAMETRIZE_MODULES):
            return self._main(name)
        return self.kernel()[0 if name == "weight" else 1]

    def kernel(self) -> tuple[Tensor, Tensor | None]:
        """``(weight, bias)`` of the one conv that computes this block now, differentiable in its parameters.

        * Not grown: the main Parameters themselves (the conv's own objects; a parametrized one's value).
        * Online mode: the assembled kernel and the main bias, exact in train and eval mode; gradients flow
          into the main kernel, the scales and the branches.
        * dbb mode: the fold with every BatchNorm's running statistics (:meth:`equivalent`), exact while
          every BatchNorm of the block uses them (eval mode). In train mode they normalise with the
          batch's statistics and no single kernel computes the block: :class:`NoSingleKernelError`.

        A grown block's kernel is computed: writing into it changes nothing (write the block's
        Parameters, or fold first).
        """
        if not self.grown:
            return self.main_weight, self.main_bias
        if self.mode == "online":
            return self._call_kernel(), self.main_bias
        batch_stats = [name or "main_bn" for name, m in self.named_modules()
                       if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)]
        if batch_stats:
            raise NoSingleKernelError(
                f"a dbb-mode RepConv2d grown with {self.kinds} has no single weight/bias while its BatchNorms "
                f"{batch_stats[:3]} normalise with batch statistics (train mode): read block.weight in eval "
                "mode (the folded kernel), block.main_weight / block.main_bias for the main kernel "
                "Parameters, or fold the model (dyrep_fx.fold); transform with mode='online' for a kernel "
                "in train mode too")
        return self.equivalent()

    def _extra_names(self) -> frozenset[str]:
        """Public instance attributes the user's conv subclass adds to Conv2d's (answered from the template)."""
        template = self.__dict__.get("_template")
        if template is None:
            return frozenset()
        return frozenset(k for k in vars(template) if not k.startswith("_") and k not in _CONV2D_INSTANCE_NAMES)

    def __getattr__(self, name: str) -> Any:
        if name in _MAIN_NAMES:
            # Its property raised NoSingleKernelError (or, to parametrize, there is no main kernel now): raise
            # it again rather than let nn.Module answer with the main kernel Parameter registered under the
            # same name.
            return self._serve(name, inspect.currentframe())
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self._extra_names():
                return getattr(self.__dict__["_template"], name)
            raise

    def __setattr__(self, name: str, value: Any) -> None:
        if name in CONV_ATTRIBUTES:
            raise AttributeError(
                f"{name} of a RepConv2d is read-only: it is the {name} of the conv the block took the place "
                "of, and changing it would change the function; fold the model (dyrep_fx.fold) and change "
                "the conv")
        branches = self.__dict__.get("_modules", {}).get("branches")
        if name in ("weight", "bias") and branches is not None and len(branches) > 0:
            raise AttributeError(
                f"cannot set {name} of a RepConv2d grown with {self.kinds}: its {name} is computed from the "
                f"main kernel and the branches; write main_{name} (the main kernel Parameter), cut the "
                "branches, or fold the model first")
        if name in self._extra_names() and name not in self.__dict__:
            # A subclass's own attribute lives on the template, which folding copies.
            setattr(self.__dict__["_template"], name, value)
            return
        parametrized = getattr(type(self), _parametrized_slot(name), None) if name in _MAIN_NAMES else None
        if parametrized is not None:
            parametrized.__set__(self, value)  # (torch's setter: through the parametrization's right_inverse)
            return
        super().__setattr__(name, value)

    @staticmethod
    def answers(conv: nn.Module, name: str) -> bool:
        """Whether a block standing in for ``conv`` has the attribute ``name``: the conv's attributes, its
        parameters, buffers and children, a subclass's own public attributes and the module machinery do;
        a method of the conv's class the block lacks (e.g. ``_conv_forward``) does not. ``weight`` and
        ``bias`` are answered with the block's kernel (:meth:`kernel`)."""
        if hasattr(RepConv2d, name) or name in _MODULE_INSTANCE_NAMES:
            return True
        if any(name in d for d in (conv._parameters, conv._buffers, conv._modules)):
            return True
        return not name.startswith("_") and name in vars(conv)

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
        return [k for k in applicable_kinds(self.geometry) if k not in self.branches]

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
            return self.main_weight, self.main_bias
        if self.mode == "online":
            return self._online_kernel(), self.main_bias
        w_main, b_main = kernels.fuse_bn(self.main_weight, self.main_bias, self.main_bn.running_mean,
                                         self.main_bn.running_var, self.main_bn.weight, self.main_bn.bias,
                                         self.main_bn.eps)
        parts = [b.kernel() for b in self.branches.values()]
        return kernels.add_branches([w_main] + [w for w, _ in parts], [b_main] + [b for _, b in parts])

    def _online_kernel(self, skip: tuple[str, ...] = ()) -> Tensor:
        terms = [branch.term() for kind, branch in self.branches.items() if kind not in skip]
        return assemble_kernel(self.main_weight, self.main_scale, terms)

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
        out = self.geometry.conv(x, self._call_kernel(skip=tuple(apart)), self.main_bias)
        for kind in apart:
            out = out + self.branches[kind](x, None)  # (it pads its intermediate map itself)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if not self.grown:
            return self.geometry.conv(x, self.main_weight, self.main_bias)
        if self.mode == "online":
            return self._online_forward(x)
        return self._dbb_forward(x)

    def _dbb_forward(self, x: Tensor) -> Tensor:
        # With zero padding every conv pads inside itself and keeps the unpadded input for backward, which
        # the layer before keeps anyway; a padded copy would be one more input-sized tensor per block.
        # Other padding modes pad once here and share the copy.
        geom = self.geometry
        xp = None if pads_with_zeros(geom) else geom.pad_input(x)
        weight, bias = self.main_weight, self.main_bias
        main = geom.conv(x, weight, bias) if xp is None else geom.conv_valid(xp, weight, bias)
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
        self._check_main_writable("grow")
        keep = self._detached_equivalent()  # the function to keep: (kernel, bias)
        if not self.grown:
            self._add_main_scale()
        new = []
        for kind in registry.kind_names():
            if kind in kinds:
                branch = registry.get_kind(kind).make(self.geometry, self.mode, self.init_scale, self.main_weight)
                if self.mode == "online":
                    self._start_at_init_share(branch, keep[0])
                branch.train(self.training)
                self.branches[kind] = branch
                new.append(branch)
        self.rebalance(*keep)
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
        self._check_main_writable("cut")
        keep = self._detached_equivalent()  # the function to keep: (kernel, bias)
        for kind in kinds:
            del self.branches[kind]
        if self.grown:
            self.rebalance(*keep)
            return
        self._remove_main_scale()
        self.main_weight.copy_(keep[0])
        if keep[1] is not None:
            self.ensure_bias()
            self.main_bias.copy_(keep[1])

    @torch.no_grad()
    def rebalance(self, weight: Tensor, bias: Tensor | None) -> None:
        """Set the main kernel so that the block's eval-mode equivalent is ``(weight, bias)``.

        The main scale (online) or main BatchNorm (dbb) is reset to an exact identity and the
        branches' current kernels are subtracted: ``W_main = W - sum_b K_b``.
        """
        self._check_main_writable("rebalance")
        parts = [b.kernel() for b in self.branches.values()]
        w_rest, b_rest = kernels.add_branches([weight] + [-w for w, _ in parts],
                                              [bias] + [None if b is None else -b for _, b in parts])
        if self.grown:
            self._reset_main_scale()
        self.main_weight.copy_(w_rest)
        if b_rest is not None:
            self.ensure_bias()
            self.main_bias.copy_(b_rest)
        elif self.main_bias is not None:
            self.main_bias.zero_()

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
        own = {"weight": nn.Parameter(weight.detach().clone(), requires_grad=self.main_weight.requires_grad),
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

    def _check_main_writable(self, action: str) -> None:
        """Growing and cutting keep the function by writing the main kernel, which a parametrization
        computes: refuse rather than write into a computed value."""
        parametrized = [name for name in _MAIN_NAMES if getattr(type(self), _parametrized_slot(name), None)]
        if parametrized:
            raise RuntimeError(
                f"cannot {action} a RepConv2d whose main {' and '.join(parametrized)} is parametrized "
                "(torch.nn.utils.parametrize): it keeps the function by writing the main kernel, which the "
                "parametrization computes; remove the parametrization first "
                "(parametrize.remove_parametrizations(block, 'weight'))")

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
        like = self.main_weight
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
        if self.main_bias is None:
            like = self.main_weight
            self._parameters["bias"] = nn.Parameter(torch.zeros(self.geometry.out_channels, device=like.device,
                                                                dtype=like.dtype))

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
                f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, mode={self.mode!r}, "
                f"kinds={self.kinds}")


def _copy_parameter(param: nn.Parameter | None) -> nn.Parameter | None:
    return None if param is None else nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)


def main_parameters(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The ``(weight, bias)`` Parameters a conv holds: a block's main kernel (:attr:`RepConv2d.main_weight`,
    :attr:`RepConv2d.main_bias`), a conv's ``weight`` / ``bias`` (where a parametrization computes one, its
    value). Library code reads Parameters through this, never a block's computed ``weight``."""
    if isinstance(module, RepConv2d):
        return module.main_weight, module.main_bias
    return module.weight, module.bias


def find_blocks(model: nn.Module, outermost: bool = False) -> dict[str, RepConv2d]:
    """Every :class:`RepConv2d` in ``model`` by qualified name; ``outermost`` skips nested ones."""
    found: dict[str, RepConv2d] = {}
    for name, m in model.named_modules():
        if isinstance(m, RepConv2d) and not (outermost and any(name.startswith(n + ".") for n in found)):
            found[name] = m
    return found
