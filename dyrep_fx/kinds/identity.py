"""``identity``: the input itself (RepVGG); in dbb mode a bare BatchNorm on the input.

Where it applies: where a one-hot kernel makes the conv the identity map (as many outputs as inputs, stride
1, and padding and dilation that keep the output aligned with the input: :meth:`ConvGeometry.identity_offset`).
"""

from __future__ import annotations

from torch import Tensor

from .. import kernels
from ..assembly import Term
from ..geometry import ConvGeometry
from .branch import Branch, fuse_with_bn
from .registry import BranchKind, register_kind
from .window_term import WindowTerm

__all__ = ["IdentityBranch", "KIND"]


class IdentityBranch(Branch):
    """``identity``: a fixed one-hot kernel, scaled (online) or a BatchNorm of the input (dbb)."""

    kind = "identity"

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        offset = geom.identity_offset()
        if offset is None:
            raise ValueError("the identity branch does not apply to this conv geometry")
        self.offset = offset
        self.register_buffer("eye", kernels.identity_kernel(
            geom.out_channels, geom.groups, geom.kernel_size, offset, like.dtype, like.device), persistent=False)

    def raw_kernel(self) -> Tensor:
        return self.eye

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        return fuse_with_bn(self.eye, None, self.bn)

    def term(self) -> Term:
        (r, c) = self.offset
        return WindowTerm(self.eye[:, :, r:r + 1, c:c + 1], self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        return self.bn(x)


def needs_identity_tap(geom: ConvGeometry) -> str | None:
    """``None`` where a one-hot kernel makes the conv the identity map, else why not."""
    if geom.identity_offset() is not None:
        return None
    if geom.in_channels != geom.out_channels:
        return f"in_channels {geom.in_channels} != out_channels {geom.out_channels}"
    if geom.stride != (1, 1):
        return f"stride {geom.stride} is not 1"
    return f"padding {geom.pads} and dilation {geom.dilation} shift the output against the input"


#: DyRep's.
KIND = register_kind(BranchKind(IdentityBranch.kind, IdentityBranch, needs_identity_tap, 60, frozenset({"dyrep"})))
