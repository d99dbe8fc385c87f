"""Conv geometry: the hyper-parameters of one ``nn.Conv2d`` and what they allow.

A block and its branches share one geometry. Branches that run on feature maps (dbb mode) all read
the same explicitly padded input and run *valid* convolutions on windows of it, so every branch is
exactly a kernel embedded in the conv's own ``kh x kw`` window, whatever the padding, stride,
dilation or padding mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

__all__ = ["ConvGeometry", "BRANCH_KINDS", "DBB_KINDS", "OREPA_KINDS"]

#: Every branch kind, in the order blocks build and report them.
BRANCH_KINDS: tuple[str, ...] = ("1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1", "identity", "prior")
#: DBB's branch set beside the kxk kernel (the static baseline DyRep compares to).
DBB_KINDS: tuple[str, ...] = ("1x1", "1x1_kxk", "1x1_avg")
#: OREPA's linear branch set (DBB's plus the frequency prior).
OREPA_KINDS: tuple[str, ...] = ("1x1", "1x1_kxk", "1x1_avg", "prior")

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class ConvGeometry:
    """The hyper-parameters of a 2-D convolution, with its padding resolved per side.

    ``pads`` is ``((top, bottom), (left, right))``; ``padding`` keeps the conv's own value (an int,
    a tuple or ``'same'``/``'valid'``) so that a folded conv is built exactly like the original.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padding: object
    padding_mode: str
    pads: tuple[tuple[int, int], tuple[int, int]]
    has_bias: bool

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvGeometry:
        """Read the geometry of ``conv`` (any ``nn.Conv2d``, subclasses included)."""
        k, s, d = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
        if conv.padding == "valid":
            pads = ((0, 0), (0, 0))
        elif conv.padding == "same":
            # torch's rule: total d*(k-1), the odd pixel goes after.
            totals = [d[i] * (k[i] - 1) for i in range(2)]
            pads = tuple((t // 2, t - t // 2) for t in totals)
        else:
            p = _pair(conv.padding)
            pads = ((p[0], p[0]), (p[1], p[1]))
        if conv.padding_mode not in _PAD_MODES:
            raise ValueError(f"unknown padding_mode {conv.padding_mode!r}")
        return cls(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=k,
            stride=s,
            dilation=d,
            groups=conv.groups,
            padding=conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
            padding_mode=conv.padding_mode,
            pads=pads,
            has_bias=conv.bias is not None,
        )

    # -- what the geometry allows -------------------------------------------------------------
    @property
    def is_pointwise(self) -> bool:
        """True for a 1x1 conv."""
        return self.kernel_size == (1, 1)

    def identity_offset(self) -> tuple[int, int] | None:
        """Where a one-hot kernel makes this conv the identity map, or ``None`` when none does."""
        if self.in_channels != self.out_channels or self.stride != (1, 1):
            return None
        offs = [
            kernels.identity_offset(self.kernel_size[i], self.dilation[i], *self.pads[i]) for i in range(2)
        ]
        return None if None in offs else (offs[0], offs[1])

    def centre(self, size: tuple[int, int] = (1, 1)) -> tuple[int, int]:
        """Offset that centres a ``size`` kernel in this conv's window."""
        return (kernels.embed_offset(self.kernel_size[0], size[0]),
                kernels.embed_offset(self.kernel_size[1], size[1]))

    def applicable_kinds(self) -> dict[str, str | None]:
        """Every branch kind mapped to ``None`` when it applies here, else to the reason it does not."""
        kh, kw = self.kernel_size
        window = None if kh * kw > 1 else "the conv is 1x1, so this branch would duplicate the main kernel"
        both = None if kh > 1 and kw > 1 else f"needs a kernel larger than 1 in both axes (has {kh}x{kw})"
        if self.identity_offset() is not None:
            ident = None
        elif self.in_channels != self.out_channels:
            ident = f"in_channels {self.in_channels} != out_channels {self.out_channels}"
        elif self.stride != (1, 1):
            ident = f"stride {self.stride} is not 1"
        else:
            ident = f"padding {self.pads} and dilation {self.dilation} shift the output against the input"
        return {
            "1x1": window,
            "1x1_kxk": None,
            "1x1_avg": window,
            "1xk": both,
            "kx1": both,
            "identity": ident,
            "prior": window,
        }

    def kinds(self) -> list[str]:
        """The branch kinds that can be made exact for this conv, in canonical order."""
        return [k for k, why in self.applicable_kinds().items() if why is None]

    # -- running convolutions in this geometry ------------------------------------------------
    def pad_input(self, x: Tensor) -> Tensor:
        """The conv's input after its own padding (any padding mode), ready for valid convolutions."""
        (top, bottom), (left, right) = self.pads
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom), mode=_PAD_MODES[self.padding_mode])

    def window(self, xp: Tensor, size: tuple[int, int], offset: tuple[int, int]) -> Tensor:
        """The part of the padded input that a ``size`` kernel at ``offset`` of the window reads."""
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        top, left = offset[0] * dh, offset[1] * dw
        bottom = (kh - size[0] - offset[0]) * dh
        right = (kw - size[1] - offset[1]) * dw
        return xp[..., top: xp.shape[-2] - bottom, left: xp.shape[-1] - right]

    def conv_valid(self, xp: Tensor, weight: Tensor, bias: Tensor | None = None, groups: int | None = None) -> Tensor:
        """A valid (unpadded) convolution with this geometry's stride and dilation."""
        return F.conv2d(xp, weight, bias, self.stride, 0, self.dilation, self.groups if groups is None else groups)

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Exactly what the original ``nn.Conv2d`` computes, with another kernel and bias."""
        if self.padding_mode != "zeros":
            return self.conv_valid(self.pad_input(x), weight, bias)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def make_conv(self, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
        """A new plain ``nn.Conv2d`` of this geometry holding ``weight`` and ``bias``."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=bias is not None, padding_mode=self.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv
