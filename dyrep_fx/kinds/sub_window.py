"""``SubWindowBranch``: a single conv of a centred sub-window of the block's window, the base of the ``1x1``,
``1xk`` and ``kx1`` kinds (each sets only its sub-window's size)."""

from __future__ import annotations

from torch import Tensor, nn

from .. import kernels
from ..assembly import Term
from ..dbb_ops import pointwise_norm, window_conv, window_edges
from ..geometry import ConvGeometry
from .branch import Branch, fuse_with_bn, init_conv
from .window_term import WindowTerm

__all__ = ["SubWindowBranch"]


class SubWindowBranch(Branch):
    """One conv of a ``window_size(geom)`` sub-window centred in the block window (then a BatchNorm in dbb
    mode); online, a :class:`~dyrep_fx.kinds.window_term.WindowTerm`."""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.size = self.window_size(geom)
        self.offset = geom.centre(self.size)
        self.conv = init_conv(nn.Conv2d(geom.in_channels, geom.out_channels, self.size, geom.stride, 0,
                                        geom.dilation, geom.groups, bias=False,
                                        device=like.device, dtype=like.dtype))

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        """The sub-window's size in a block of ``geom``."""
        raise NotImplementedError

    def raw_kernel(self) -> Tensor:
        return kernels.embed_kernel(self.conv.weight, self.geom.kernel_size, self.offset)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w, b = fuse_with_bn(self.conv.weight, None, self.bn)
        return kernels.embed_kernel(w, self.geom.kernel_size, self.offset), b

    def term(self) -> Term:
        return WindowTerm(self.conv.weight, self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        if xp is None:
            if recompute and self.size == (1, 1) and not any(window_edges(self.geom, x.shape[-2:], self.size,
                                                                           self.offset)):
                # the centred 1x1 reads the input as it is: a 1x1 stage (see dbb_ops.pointwise_norm)
                return pointwise_norm(self.bn, x, self.conv.weight, self.geom, self.geom.stride, False, True)
            return self.bn(window_conv(self.geom, x, self.conv.weight, self.size, self.offset))
        window = self.geom.window(xp, self.size, self.offset)
        return self.bn(self.geom.conv_valid(window, self.conv.weight))
