"""Trace a model with torch.fx into the facts the passes need, without changing the model.

Convs, norm layers and re-parameterization blocks are leaves. A submodule whose forward cannot be
traced becomes a leaf too (the error is recorded against its name) and tracing is retried; when
the root's own forward cannot be traced, its children are traced one by one (a forest of graphs).

What comes out (:class:`TracedModel`) is plain data: for every conv-like module, how often the graph
calls it and which nodes use its output; for every leaf that could not be traced, why. With
example inputs, a run-time pass with forward hooks adds shapes and actual call counts.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from .block import RepConv2d, main_parameters

__all__ = ["TracedModel", "ConvUse", "trace_model", "TraceFailure", "conv_modules", "set_training_flags"]

log = logging.getLogger(__name__)

_NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_MAX_RETRIES = 200


class TraceFailure(RuntimeError):
    """Raised when nothing of a model can be traced, or it holds no convolution at all."""


@dataclass
class ConvUse:
    """How the traced graph(s) use one conv-like module."""

    calls: int = 0
    users: list[str] = field(default_factory=list)  # one entry per user node: "call_module:<qualname>" etc.
    next_bn: str | None = None  # qualname of the BatchNorm that is the sole user of its only call
    graph: str = ""  # qualname of the module whose traced graph holds the call ("" = the root)
    runtime_calls: int | None = None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    #: How the weight (or bias) is used other than by the conv's own forward, if it is: a traced
    #: ``get_attr`` node, or an op seen at run time (e.g. ``conv2d`` called on ``conv.weight`` directly).
    weight_used_outside: str | None = None
    #: Attributes code other than the conv's own forward read on it (while tracing or running) that a
    #: block standing in for it answers differently or not at all: ``weight`` / ``bias`` (no single value
    #: in dbb mode in train mode) and names a block lacks (e.g. a method of the conv's class).
    attributes_read_outside: list[str] = field(default_factory=list)


@dataclass
class TracedModel:
    """The facts torch.fx found in one model (plain data, safe to keep on the model)."""

    convs: dict[str, ConvUse]
    untraceable: dict[str, str]  # leaf qualname -> trace error
    root_traced: bool
    graph_differs_in_eval: bool
    norm_calls: dict[str, int] = field(default_factory=dict)
    graph: fx.Graph | None = None  # the root graph, when the root traced; dropped when copied

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["graph"] = None
        return state

    def __deepcopy__(self, memo: dict) -> TracedModel:
        import copy

        state = copy.deepcopy(self.__getstate__(), memo)
        new = TracedModel.__new__(TracedModel)
        new.__dict__.update(state)
        return new

    def leaf_containing(self, name: str) -> str | None:
        """The untraceable leaf that contains module ``name``, if any."""
        for leaf in self.untraceable:
            if leaf and name == leaf or name.startswith(leaf + "."):
                return leaf
        return None


class _Tracer(fx.Tracer):
    """fx tracer with conv/norm/block leaves, extra leaves by name, and failure localisation."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names:
            return True
        if isinstance(m, (_ConvNd, RepConv2d) + _NORM_TYPES + self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost non-leaf module whose forward raised is the one to make a leaf.
            if self.failed_in is None:
                qualname = self.path_of_module(m)
                if not self.is_leaf_module(m, qualname):
                    self.failed_in = qualname
            raise


_UNWRAPPED: dict[type, type] = {}


@contextmanager
def _unwrapped_forward(root: nn.Module) -> Iterator[None]:
    """Trace the innermost function of a decorated ``forward``.

    fx reads the signature of the innermost function (``inspect.unwrap``) but calls the decorator's
    wrapper with it, which fails for a wrapper taking ``(*args, **kwargs)`` (Hugging Face's
    ``can_return_tuple``: "Proxy object cannot be iterated"). For the trace only, the root's class is a
    subclass whose ``forward`` is the innermost function (what a decorator adds around it, such as
    turning the output into a tuple, is no conv call); the class is put back on leaving.
    """
    cls = type(root)
    inner = inspect.unwrap(cls.forward)
    if inner is cls.forward:
        yield
        return
    if cls not in _UNWRAPPED:
        _UNWRAPPED[cls] = type(cls.__name__, (cls,), {"forward": inner, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__})
    root.__class__ = _UNWRAPPED[cls]
    try:
        yield
    finally:
        root.__class__ = cls


def _trace_once(root: nn.Module, leaf_names: set[str], leaf_types, concrete_args) -> fx.Graph:
    tracer = _Tracer(leaf_names, leaf_types)
    try:
        with _unwrapped_forward(root):
            return tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:
        exc.failed_in = tracer.failed_in  # type: ignore[attr-defined]
        raise


def _trace_with_leaf_fallback(
    root: nn.Module, leaf_types, concrete_args, untraceable: dict[str, str]
) -> fx.Graph:
    """Trace ``root``, turning each submodule that fails into a leaf, until the trace succeeds."""
    leaf_names: set[str] = set()
    for _ in range(_MAX_RETRIES):
        try:
            return _trace_once(root, leaf_names, leaf_types, concrete_args)
        except Exception as exc:
            failed_in = getattr(exc, "failed_in", None)
            if not failed_in:
                raise
            untraceable[failed_in] = f"{type(exc).__name__}: {exc}".strip().split("\n")[0]
            leaf_names.add(failed_in)
            log.info("submodule %r does not trace (%s); it becomes a leaf", failed_in, untraceable[failed_in])
    raise TraceFailure(f"gave up after {_MAX_RETRIES} untraceable submodules")


def _record_graph(
    graph: fx.Graph, prefix: str, modules: dict[str, nn.Module], convs: dict[str, ConvUse], norm_calls: dict[str, int]
) -> None:
    """Count conv calls in ``graph`` (traced from module ``prefix``) and note who uses each output."""
    for node in graph.nodes:
        if node.op == "get_attr":
            _note_attribute_use(str(node.target), prefix, modules, convs)
        if node.op != "call_module":
            continue
        name = f"{prefix}.{node.target}" if prefix else str(node.target)
        module = modules.get(name)
        if isinstance(module, _NORM_TYPES):
            norm_calls[name] = norm_calls.get(name, 0) + 1
        if not isinstance(module, (_ConvNd, RepConv2d)):
            continue
        use = convs.setdefault(name, ConvUse(graph=prefix))
        use.calls += 1
        users = list(node.users)
        for user in users:
            target = f"{prefix}.{user.target}" if prefix and user.op == "call_module" else str(user.target)
            use.users.append(f"{user.op}:{target}")
        if use.calls == 1 and len(users) == 1 and users[0].op == "call_module":
            bn_name = f"{prefix}.{users[0].target}" if prefix else str(users[0].target)
            if isinstance(modules.get(bn_name), _BatchNorm):
                use.next_bn = bn_name
        if use.calls > 1:
            use.next_bn = None


def _note_attribute_use(target: str, prefix: str, modules: dict[str, nn.Module], convs: dict[str, ConvUse]) -> None:
    """A graph reads ``<conv>.weight`` / ``<conv>.bias`` itself: growing that conv would change the read value."""
    owner, _, attr = target.rpartition(".")
    name = f"{prefix}.{owner}" if prefix and owner else (owner or prefix)
    if attr in ("weight", "bias") and isinstance(modules.get(name), (_ConvNd, RepConv2d)):
        convs.setdefault(name, ConvUse(graph=prefix)).weight_used_outside = f"the traced graph reads {attr}"


class _OutsideUseWatch(TorchFunctionMode):
    """Records ops that take a conv's weight or bias while that conv's own forward is not running."""

    def __init__(self, owners: dict[int, str]) -> None:
        super().__init__()
        self.owners = owners
        self.active: list[str] = []
        self.outside: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            for value in itertools.chain(args, kwargs.values()):
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    name = self.owners.get(id(t)) if isinstance(t, torch.Tensor) else None
                    if name is not None and name not in self.active:
                        self.outside.setdefault(name, f"{getattr(func, '__name__', func)} takes its weight "
                                                      "outside its forward")
        return result


class _AttributeReadWatch:
    """Records attribute reads on a model's convs by code other than the conv's own forward.

    The user's code keeps running against a block where the conv was, so what it reads on the conv must
    be there on the block: names a block does not answer (:meth:`RepConv2d.answers`) and ``weight`` /
    ``bias`` (computed on a block, see :meth:`RepConv2d.kernel`) are noted per conv. It watches by
    giving each conv class a recording ``__getattribute__`` while the context is open (taken away on
    leaving, even on error); ``active`` holds the convs whose own forward is running.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): name for name, m in conv_modules(model).items() if not isinstance(m, RepConv2d)}
        self.modules = {name: m for name, m in conv_modules(model).items() if not isinstance(m, RepConv2d)}
        self.active: list[str] = []
        self.reads: dict[str, list[str]] = {}
        self._patched: list[type] = []

    def note(self, obj: object, attr: str) -> None:
        name = self.names.get(id(obj))
        if name is None or name in self.active or attr in self.reads.get(name, ()):
            return
        if attr in ("weight", "bias") or not RepConv2d.answers(self.modules[name], attr):
            self.reads.setdefault(name, []).append(attr)

    def __enter__(self) -> _AttributeReadWatch:
        for cls in {type(m) for m in self.modules.values()}:
            if "__getattribute__" in vars(cls):
                continue  # (a class with its own __getattribute__ is left alone)
            nxt = next(vars(c)["__getattribute__"] for c in cls.__mro__[1:] if "__getattribute__" in vars(c))

            def read(obj, attr, _nxt=nxt):
                if attr[:2] != "__":
                    self.note(obj, attr)
                return _nxt(obj, attr)

            cls.__getattribute__ = read
            self._patched.append(cls)
        return self

    def __exit__(self, *exc) -> None:
        for cls in self._patched:
            del cls.__getattribute__
        self._patched.clear()


def _graph_signature(graph: fx.Graph) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in graph.nodes]


def set_training_flags(model: nn.Module, flags: dict[str, bool] | bool) -> dict[str, bool]:
    """Set every module's ``training`` flag directly (no ``train()`` overrides run); return the old ones."""
    old = {name: m.training for name, m in model.named_modules()}
    for name, m in model.named_modules():
        m.training = flags if isinstance(flags, bool) else flags[name]
    return old


def _concrete_args_for(model: nn.Module, example_inputs: tuple | None) -> dict[str, Any] | None:
    """Placeholders for tuple/list arguments, so code like ``len(inputs)`` traces (e.g. mmdet FPN)."""
    if not example_inputs:
        return None
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    concrete: dict[str, Any] = {}
    for param, value in zip(params, example_inputs):
        if isinstance(value, (tuple, list)):
            concrete[param.name] = type(value)(fx.PH for _ in value)
    return concrete or None


def _runtime_facts(model: nn.Module, example_inputs: tuple, convs: dict[str, ConvUse],
                   reads: _AttributeReadWatch | None = None) -> None:
    """Run the model once (eval mode, no grad, flags restored) counting conv calls and shapes, and
    noting any op that takes a conv's weight outside that conv's own forward (code torch.fx could not
    trace may do so; growing such a conv would change what that op computes)."""
    handles = []
    counts: Counter[str] = Counter()
    owners: dict[int, str] = {}
    watch = _OutsideUseWatch(owners)
    if reads is None:
        reads = _AttributeReadWatch(nn.Module())
    reads.active = watch.active  # a conv's own forward reads what it likes

    def enter(name):
        def record(mod, inputs):
            watch.active.append(name)
        return record

    def leave(name):
        def record(mod, inputs, output):
            watch.active.remove(name)
            counts[name] += 1
            use = convs.setdefault(name, ConvUse())
            if isinstance(inputs[0], torch.Tensor) and use.input_shape is None:
                use.input_shape = tuple(inputs[0].shape)
            if isinstance(output, torch.Tensor) and use.output_shape is None:
                use.output_shape = tuple(output.shape)
        return record

    for name, m in model.named_modules():
        if isinstance(m, (_ConvNd, RepConv2d)):
            handles.append(m.register_forward_pre_hook(enter(name)))
            handles.append(m.register_forward_hook(leave(name)))
            for p in main_parameters(m):
                if p is not None:
                    owners.setdefault(id(p), name)
    old = set_training_flags(model, False)
    try:
        with torch.no_grad(), watch, reads:
            model(*example_inputs)
    finally:
        set_training_flags(model, old)
        for h in handles:
            h.remove()
    for name, use in convs.items():
        use.runtime_calls = counts.get(name, 0)
    for name, how in watch.outside.items():
        convs.setdefault(name, ConvUse(runtime_calls=counts.get(name, 0))).weight_used_outside = how


def conv_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv-like module outside re-parameterization blocks (blocks themselves included)."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, RepConv2d):
            skip.append(name)
            found[name] = m
        elif isinstance(m, _ConvNd):
            found[name] = m
    return found


def _default_flags(module: nn.Module) -> dict[str, Any] | None:
    """A child traced on its own is called by untraced code: fix its flag arguments at their defaults.

    (e.g. mmcv's ``ConvModule.forward(x, activate=True, norm=True)``, whose flags would otherwise be
    traced as inputs and fail in ``if activate``.)
    """
    return _input_flags(module, None)


def _trace_forest(
    module: nn.Module, prefix: str, leaf_types, modules, convs, untraceable: dict[str, str],
    norm_calls: dict[str, int],
) -> None:
    """The root cannot be traced: trace each child on its own (recursing into containers)."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, (_ConvNd, RepConv2d)) or not any(
            isinstance(m, (_ConvNd, RepConv2d)) for m in child.modules()
        ):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            _trace_forest(child, name, leaf_types, modules, convs, untraceable, norm_calls)
            continue
        sub_untraceable: dict[str, str] = {}
        try:
            graph = _trace_with_leaf_fallback(child, leaf_types, _default_flags(child), sub_untraceable)
        except Exception as exc:
            untraceable[name] = f"{type(exc).__name__}: {exc}".split("\n")[0]
            continue
        for leaf, why in sub_untraceable.items():
            untraceable[f"{name}.{leaf}"] = why
        _record_graph(graph, name, modules, convs, norm_calls)


def _input_flags(model: nn.Module, example_inputs: tuple | None) -> dict[str, Any] | None:
    """The root's flag arguments fixed at their defaults, its inputs left free, for a second try at
    tracing a root whose forward branches on them (Hugging Face models: ``return_dict``,
    ``output_hidden_states``, ``labels``; their input is ``model.main_input_name``, e.g. ``pixel_values``,
    whose ``None`` default is no flag). The inputs are the example inputs' positions, or else the first
    parameter and ``main_input_name``."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    inputs = {p.name for p in positional[:max(len(example_inputs or ()), 1)]}
    main_input = getattr(model, "main_input_name", None)
    if isinstance(main_input, str):
        inputs.add(main_input)
    flags: dict[str, Any] = {p.name: p.default for p in params
                             if p.name not in inputs and p.default is not inspect.Parameter.empty
                             and isinstance(p.default, (bool, type(None), int, str))}
    # ``**kwargs`` passed on (``self.convnext(pixel_values, **kwargs)``) must be a dict, not a Proxy
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind is p.VAR_KEYWORD and flags:
            flags[f"**{p.name}"] = {}
    return flags or None


def _refuse_torchscript(model: nn.Module) -> None:
    """A TorchScript module (``torch.jit.script`` / ``torch.jit.trace``) hides its convs as compiled
    submodules, which torch.fx cannot trace and which are no ``nn.Conv2d``: say so instead of reporting
    a model without convolutions."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceFailure(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script / torch.jit.trace): torch.fx "
            "cannot trace TorchScript and its convs are not nn.Conv2d modules; pass the eager nn.Module "
            "(the one given to torch.jit.script), and script the folded model afterwards if you need to")


def _scripted_hint(model: nn.Module) -> str:
    """Why a model may seem to hold no convolution: convs inside TorchScript submodules are not visible."""
    scripted: list[str] = []
    for name, module in model.named_modules():
        outermost = not any(name.startswith(f"{s}.") for s in scripted)
        if name and outermost and isinstance(module, torch.jit.ScriptModule):
            scripted.append(name)
    if not scripted:
        return ""
    return (f" (its submodules {scripted[:3]} are TorchScript modules, whose convs torch.fx cannot see; "
            "build them as eager nn.Modules)")


def _trace_root(model: nn.Module, leaf_types, concrete_args: dict[str, Any] | None, example_inputs: tuple | None,
                untraceable: dict[str, str]) -> tuple[fx.Graph | None, dict[str, Any] | None]:
    """The root's graph and the concrete arguments it traced with, or ``(None, ...)`` with the root's
    error under ``untraceable[""]``. A root that fails with its arguments free is tried again with its
    flag arguments at their defaults (:func:`_input_flags`)."""
    try:
        return _trace_with_leaf_fallback(model, leaf_types, concrete_args, untraceable), concrete_args
    except Exception as exc:
        root_error = f"{type(exc).__name__}: {exc}".split("\n")[0]
    flags = _input_flags(model, example_inputs) if concrete_args is None else None
    if flags:
        retry: dict[str, str] = {}
        try:
            graph = _trace_with_leaf_fallback(model, leaf_types, flags, retry)
        except Exception:
            graph = None
        if graph is not None:
            log.info("%s traced with its arguments %s fixed at their defaults",
                     type(model).__name__, sorted(flags))
            untraceable.clear()
            untraceable.update(retry)
            return graph, flags
    untraceable[""] = root_error
    return None, concrete_args


def trace_model(
    model: nn.Module,
    example_inputs: tuple | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
) -> TracedModel:
    """Trace ``model`` (in training mode, then eval mode to compare) and return what the passes need.

    Never changes the model: training flags are restored and nothing is registered on it.
    Raises :class:`TraceFailure` when the model holds no convolution at all, or is a TorchScript module.
    """
    _refuse_torchscript(model)
    leaf_types = tuple(leaf_modules)
    modules = dict(model.named_modules())
    if not conv_modules(model):
        raise TraceFailure(f"{type(model).__name__} holds no convolution: nothing to re-parameterize"
                           f"{_scripted_hint(model)}")
    if concrete_args is None:
        concrete_args = _concrete_args_for(model, example_inputs)
    untraceable: dict[str, str] = {}
    convs: dict[str, ConvUse] = {}
    norm_calls: dict[str, int] = {}
    old = set_training_flags(model, True)
    reads = _AttributeReadWatch(model)
    try:
        with reads:
            graph, concrete_args = _trace_root(model, leaf_types, concrete_args, example_inputs, untraceable)
            if graph is None:
                log.info("the root module does not trace (%s); tracing its children one by one",
                         untraceable[""])
                _trace_forest(model, "", leaf_types, modules, convs, untraceable, norm_calls)
            differs = False
            if graph is not None:
                _record_graph(graph, "", modules, convs, norm_calls)
                set_training_flags(model, False)
                try:
                    eval_graph = _trace_once(model, set(untraceable), leaf_types, concrete_args)
                    differs = _graph_signature(eval_graph) != _graph_signature(graph)
                except Exception:
                    differs = True
                if differs:
                    log.warning("%s traces to a different graph in eval mode than in train mode",
                                type(model).__name__)
    finally:
        set_training_flags(model, old)
    if example_inputs is not None:
        _runtime_facts(model, tuple(example_inputs), convs, reads)
    for name, attrs in reads.reads.items():
        convs.setdefault(name, ConvUse()).attributes_read_outside = list(attrs)
    if graph is None and not any(use.calls or use.runtime_calls for use in convs.values()):
        raise TraceFailure(
            f"nothing of {type(model).__name__} could be traced by torch.fx: {untraceable.get('')}. "
            f"Pass example_inputs=(x,) with an input x for {type(model).__name__}.forward (its calls are then "
            "counted at run time), leaf_modules=[...] for custom layers, or concrete_args={...} fixing the "
            "forward's flag arguments."
        )
    return TracedModel(convs=convs, untraceable=untraceable, root_traced=graph is not None,
                       graph_differs_in_eval=differs, norm_calls=norm_calls, graph=graph)
