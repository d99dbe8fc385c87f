"""``Branch``: the base class of every kind's branch module, and the helpers its subclasses share.

A branch knows, about itself:

* ``kernel()``: its exact equivalent ``(W, b)`` in the block's own ``kh x kw`` window (eval mode);
* ``term()``: online mode, its share of the block's one kernel, a :class:`~dyrep_fx.assembly.Term`;
* ``forward(x, xp, recompute)``: the feature-map computation of ``dbb`` mode (and online, of a branch that
  :meth:`~Branch.runs_apart`), on the block input ``x`` and the block's explicitly padded input ``xp``
  (``None`` when the conv pads with zeros: :func:`~dyrep_fx.dbb_ops.pads_with_zeros`).

Memory: a branch saves no more for backward than a plain DBB block does. With zero padding no branch
reads a padded copy of the input: window convolutions pad (or crop) inside the convolution
(:func:`~dyrep_fx.dbb_ops.window_conv`), and a 1x1 stage runs on the unpadded input, since a 1x1 conv
without bias maps the padding to itself (zeros to zeros, reflected pixels to reflected outputs), and its
output is padded after it. The dbb-mode stages that keep less than their plain modules would are in
:mod:`dyrep_fx.dbb_ops`.

Modes:

* ``online`` (OREPA): the branch is linear and bias-free, scaled per output channel by ``scale``;
  the block adds ``scale * raw_kernel()`` into one kernel (through :meth:`Branch.term`) and runs one
  convolution.
* ``dbb`` (DBB / DyRep): the branch ends in its own BatchNorm ``bn`` whose ``weight`` is the scale.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import kernels
from ..assembly import Term
from ..geometry import ConvGeometry

__all__ = ["Branch", "init_conv", "new_bn", "fuse_with_bn"]


def init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` with DyRep's initialisation of new branches (He-normal, fan-out)."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def new_bn(channels: int, gamma: float, like: Tensor) -> nn.BatchNorm2d:
    """A BatchNorm of ``channels`` whose weight starts at ``gamma``, on ``like``'s device and dtype."""
    bn = nn.BatchNorm2d(channels, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        bn.weight.fill_(gamma)
    return bn


def fuse_with_bn(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(weight, bias)`` followed by ``bn`` (eval mode) as one kernel and bias."""
    return kernels.fuse_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


class Branch(nn.Module):
    """Base class: holds the block geometry and the branch's scale (``scale`` or ``bn.weight``).

    A kind's branch class sets :attr:`kind` (its name, its key in ``block.branches``) and implements
    :meth:`raw_kernel`, :meth:`term`, :meth:`dbb_kernel` and ``forward``.
    """

    kind: ClassVar[str] = ""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__()
        self.geom = geom
        self.mode = mode
        if mode == "online":
            self.scale = nn.Parameter(torch.full((geom.out_channels,), float(init_scale),
                                                 device=like.device, dtype=like.dtype))
        else:
            self.bn = new_bn(geom.out_channels, init_scale, like)

    def raw_kernel(self) -> Tensor:
        """The branch's unscaled linear kernel in the block window (online mode)."""
        raise NotImplementedError

    def inner_convs(self) -> dict[str, nn.Module]:
        """The branch's growable inner convs by path relative to the branch (for nested growth)."""
        return {}

    @classmethod
    def inner_geometries(cls, geom: ConvGeometry) -> dict[str, ConvGeometry]:
        """The geometries of the convs :meth:`inner_convs` holds in a block of ``geom`` (structure checks)."""
        return {}

    def runs_apart(self, shape: tuple[int, ...], execution: str) -> bool:
        """Online mode: whether the branch runs as its own convolutions on an input of ``shape`` instead of
        joining the block's one kernel (see :mod:`dyrep_fx.execution`)."""
        return False

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        """The branch's equivalent kernel and bias with every BatchNorm fused (dbb mode, eval)."""
        raise NotImplementedError

    def kernel(self) -> tuple[Tensor, Tensor | None]:
        """Exact eval-mode equivalent ``(W, b)`` of this branch in the block window."""
        if self.mode == "online":
            return self.scale.reshape(-1, 1, 1, 1) * self.raw_kernel(), None
        return self.dbb_kernel()

    def term(self) -> Term:
        """This branch's share ``scale * raw_kernel()`` of the online kernel, for :mod:`dyrep_fx.assembly`."""
        raise NotImplementedError

    def gamma(self) -> Tensor:
        """The per-channel scale of this branch (its ``scale`` or its last BatchNorm's ``weight``)."""
        return self.scale if self.mode == "online" else self.bn.weight

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, mode={self.mode!r}"
