"""Which ``nn.Conv2d`` classes a re-parameterization block can stand in for exactly, and how they pad.

A :class:`~dyrep_fx.block.RepConv2d` computes its conv itself (``ConvGeometry.conv``) and never calls
the wrapped module's ``forward``. That is exact only when the class's function is a plain convolution
of its ``weight`` with its stored hyper-parameters. A subclass whose ``forward`` or ``_conv_forward``
differs from ``nn.Conv2d``'s may compute anything from its weight (weight standardisation, a learned
gain, fake quantisation, a normalised predictor), and the sum of the branches' kernels would not be
what it needs: such classes are refused, unless listed here as known. Subclasses that only add
attributes, buffers or methods keep ``nn.Conv2d``'s forward and stay eligible.

Known classes, each with a *padding rule*:

* :data:`STATIC`: pads by its stored ``padding`` / ``padding_mode`` (``nn.Conv2d`` itself, and mmcv's
  ``Conv``/``mmcv.cnn.Conv2d`` wrapper, whose forward differs only for empty inputs on torch <= 1.4).
* :data:`SAME_FROM_INPUT`: TensorFlow "same" padding computed from the input size at every call
  (mmcv's ``Conv2dAdaptivePadding``, timm's ``Conv2dSame``): per axis
  ``pad = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)``, ``pad // 2`` before and the rest
  after, zeros, then a convolution without padding. Supported when the stored ``padding`` is 0.

A class counts as known only while it keeps the listed class's ``forward`` and ``_conv_forward``
functions: a subclass that overrides either is judged on its own. Third-party classes are matched by
module and class name (nothing is imported here); your own classes join with
:func:`register_conv_class`.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["STATIC", "SAME_FROM_INPUT", "PADDING_RULES", "KNOWN_CLASSES", "register_conv_class",
           "padding_rule", "why_not_exact"]

#: Pads by the stored ``padding`` and ``padding_mode``, as ``nn.Conv2d`` does.
STATIC = "static"
#: Zero-pads to TensorFlow "same" computed from the input size at each call, then a valid convolution.
SAME_FROM_INPUT = "same_from_input"
#: Every padding rule a block can reproduce.
PADDING_RULES: tuple[str, ...] = (STATIC, SAME_FROM_INPUT)

#: Third-party ``nn.Conv2d`` subclasses with their own forward whose function is known exactly:
#: ``(module, class name) -> padding rule``. Their sources were checked against the rule (see above).
KNOWN_CLASSES: dict[tuple[str, str], str] = {
    ("mmcv.cnn.bricks.wrappers", "Conv2d"): STATIC,
    ("mmcv.cnn.bricks.conv2d_adaptive_padding", "Conv2dAdaptivePadding"): SAME_FROM_INPUT,
    ("timm.layers.conv2d_same", "Conv2dSame"): SAME_FROM_INPUT,
    ("timm.models.layers.conv2d_same", "Conv2dSame"): SAME_FROM_INPUT,
}

# Classes registered at run time (your own), by class object.
_REGISTERED: dict[type, str] = {nn.Conv2d: STATIC}

_METHODS = ("forward", "_conv_forward")

C = TypeVar("C", bound=type)


def register_conv_class(cls: C, padding: str = STATIC) -> C:
    """Declare that ``cls`` (an ``nn.Conv2d`` subclass) computes a plain convolution of its weight.

    ``padding`` says how it pads its input: :data:`STATIC` (its stored ``padding``, like
    ``nn.Conv2d``) or :data:`SAME_FROM_INPUT` (TensorFlow "same" from the input size at each call; see
    the module docstring for the exact rule). The declaration covers ``cls`` and subclasses that keep
    its ``forward`` and ``_conv_forward``; it is a promise the library cannot check, so a wrong one makes
    growth inexact. Returns ``cls``, so it can decorate a class definition.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Conv2d)):
        raise TypeError(f"register_conv_class takes an nn.Conv2d subclass, got {cls!r}")
    if padding not in PADDING_RULES:
        raise ValueError(f"padding must be one of {PADDING_RULES}, got {padding!r}")
    _REGISTERED[cls] = padding
    return cls


def _rule_of(cls: type) -> str | None:
    """The rule ``cls`` itself is listed or registered with (not its bases), or None."""
    if cls in _REGISTERED:
        return _REGISTERED[cls]
    return KNOWN_CLASSES.get((cls.__module__, cls.__qualname__))


def _known_base(cls: type) -> tuple[type, str] | None:
    """The nearest listed class in ``cls``'s MRO whose forward and _conv_forward ``cls`` still uses."""
    for base in cls.__mro__:
        rule = _rule_of(base)
        if rule is not None and all(getattr(cls, m, None) is getattr(base, m, None) for m in _METHODS):
            return base, rule
    return None


def padding_rule(cls: type) -> str | None:
    """How convs of class ``cls`` pad their input (:data:`STATIC` or :data:`SAME_FROM_INPUT`), or None
    when the class's function is not known to be a plain convolution of its weight."""
    found = _known_base(cls)
    return None if found is None else found[1]


def why_not_exact(conv: nn.Module) -> str | None:
    """Why a block could not reproduce ``conv``'s function exactly (naming its class), or None if it can."""
    cls = type(conv)
    name = cls.__name__
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is not a Conv2d (only 2-D convolutions are re-parameterized)"
    patched = [m for m in _METHODS if m in vars(conv)]
    if patched:
        return (f"this {name} has its own {', '.join(patched)} set on the instance, so its function is not "
                "a plain convolution of its weight; growing it would change what it computes")
    found = _known_base(cls)
    if found is None:
        changed = [m for m in _METHODS if getattr(cls, m, None) is not getattr(nn.Conv2d, m)]
        where = ", ".join(
            m if getattr(cls, m).__qualname__ == f"{name}.{m}" else f"{m} (as {getattr(cls, m).__qualname__})"
            for m in changed)
        return (f"{name} overrides {where}, so its function is not a plain convolution of its weight; "
                "growing it would change what it computes")
    if found[1] == SAME_FROM_INPUT and conv.padding not in ((0, 0), "valid"):
        return (f"{name} pads to TensorFlow 'same' from the input size and also has padding={conv.padding}; "
                "only padding 0 is supported there")
    return None
