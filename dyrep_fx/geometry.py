"""Conv geometry: the hyper-parameters of one ``nn.Conv2d`` and what they allow.

A block and its branches share one geometry. Branches that run on feature maps (dbb mode) all read
the same explicitly padded input and run *valid* convolutions on windows of it, so every branch is
exactly a kernel embedded in the conv's own ``kh x kw`` window, whatever the padding, stride,
dilation or padding mode. A conv class that pads to TensorFlow "same" from the input size at
every call (:data:`~dyrep_fx.conv_classes.SAME_FROM_INPUT`, e.g. mmcv's ``Conv2dAdaptivePadding``)
gets its pads computed per call the same way, after which everything runs as valid convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .conv_classes import SAME_FROM_INPUT, padding_rule

__all__ = ["ConvGeometry"]

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow "same" padding of one axis of length ``size``: the odd pixel goes after."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return (total // 2, total - total // 2)


@dataclass(frozen=True)
class ConvGeometry:
    """The hyper-parameters of a 2-D convolution, with its padding resolved per side.

    ``pads`` is ``((top, bottom), (left, right))``; ``padding`` keeps the conv's own value (an int,
    a tuple or ``'same'``/``'valid'``) so that a folded conv is built exactly like the original.

    ``same_from_input`` marks a conv class that zero-pads to TensorFlow "same" computed from the input
    size at every call (its stored ``padding`` is 0): :meth:`pads_for` then depends on the input size,
    and ``pads`` holds the pads of stride 1, which are the same for every input size (exact there;
    nominal for larger strides, where no kind depends on them).
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
    same_from_input: bool = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ConvGeometry:
        """Read the geometry of ``conv`` (any ``nn.Conv2d``, subclasses included)."""
        k, s, d = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
        same_from_input = padding_rule(type(conv)) == SAME_FROM_INPUT
        if same_from_input:
            pads = tuple(_same_pads(1, k[i], 1, d[i]) for i in range(2))
        elif conv.padding == "valid":
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
            same_from_input=same_from_input,
        )

    # -- what the geometry allows -------------------------------------------------------------
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

    # -- running convolutions in this geometry ------------------------------------------------
    def pads_for(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The pads per side for an input of spatial ``size`` (``pads``, unless they come from the size)."""
        if not self.same_from_input:
            return self.pads
        return tuple(_same_pads(size[i], self.kernel_size[i], self.stride[i], self.dilation[i]) for i in range(2))

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The spatial size of this conv's output for an input of spatial ``size``."""
        pads = self.pads_for(size)
        return tuple((n + pb + pa - d * (k - 1) - 1) // s + 1 for n, (pb, pa), k, s, d
                     in zip(size, pads, self.kernel_size, self.stride, self.dilation))

    def pad_input(self, x: Tensor) -> Tensor:
        """The conv's input after its own padding (any padding mode), ready for valid convolutions."""
        (top, bottom), (left, right) = self.pads_for((x.shape[-2], x.shape[-1]))
        if top == bottom == left == right == 0:
            return x
        mode = "constant" if self.same_from_input else _PAD_MODES[self.padding_mode]
        return F.pad(x, (left, right, top, bottom), mode=mode)

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
        """Exactly what the original ``nn.Conv2d`` computes, with another kernel and bias.

        On a map so small that some kernel taps read only zero padding (a 3x3 conv on a 1x1 map reads
        nothing but its centre tap), the kernel is cropped to the taps that read the input: the same sums
        without the zero terms, and a 1x1 convolution costs far less than a 3x3 one on such maps
        (oneDNN's backward of a 3x3 kernel on 1x1 maps runs at a fraction of its usual speed).
        """
        if self.padding_mode != "zeros" or self.same_from_input:
            return self.conv_valid(self.pad_input(x), weight, bias)
        crop = self._live_taps((x.shape[-2], x.shape[-1]))
        if crop is not None:
            (r0, r1, ph), (c0, c1, pw) = crop
            return F.conv2d(x, weight[:, :, r0:r1, c0:c1], bias, self.stride, (ph, pw), self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def taps_run(self, size: tuple[int, int]) -> tuple[int, int]:
        """The kernel size :meth:`conv` runs on a map of ``size``: smaller than ``kernel_size`` where some
        taps would read only zero padding (zero padding only)."""
        crop = self._live_taps(size)
        if crop is None:
            return self.kernel_size
        return tuple(stop - first for first, stop, _ in crop)

    def _live_taps(self, size: tuple[int, int]) -> tuple[tuple[int, int, int], ...] | None:
        """``(first, stop, padding)`` per axis of the kernel taps that read the input on a map of ``size``
        and the padding that keeps every output where it was; ``None`` when every tap reads the input, the
        cropped conv would need other padding on its two sides, or the padding is not plain zeros."""
        if self.padding_mode != "zeros" or self.same_from_input:
            return None
        axes = []
        for n, out, k, s, d, (pb, _) in zip(size, self.output_size(size), self.kernel_size, self.stride,
                                            self.dilation, self.pads):
            # tap u reads rows u*d - pb ... (out-1)*s + u*d - pb: live when that range meets [0, n)
            live = [u for u in range(k) if u * d - pb <= n - 1 and (out - 1) * s + u * d - pb >= 0]
            if not live:
                return None
            first, stop = live[0], live[-1] + 1
            pad = pb - first * d
            if pad < 0 or (n + 2 * pad - d * (stop - first - 1) - 1) // s + 1 != out:
                return None
            axes.append((first, stop, pad))
        if all(first == 0 and stop == k for (first, stop, _), k in zip(axes, self.kernel_size)):
            return None
        return tuple(axes)
