"""``WindowTerm``: a small kernel at a tap offset of the window, the online term of every kind whose kernel
is one (scaled) conv of a sub-window: ``1x1``, ``1xk``, ``kx1``, ``identity`` and the large-kernel kinds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor

from ..assembly import Term, channel_dot, per_channel, scaled

__all__ = ["WindowTerm"]


@dataclasses.dataclass(frozen=True)
class WindowTerm(Term):
    """``scale[o] * small[o, i, u, v]`` placed at tap ``offset`` of the kernel window; backward reads only
    the slice of the kernel's gradient under it."""

    small: Tensor
    scale: Tensor
    offset: tuple[int, int]

    tensors_of = ("small", "scale")

    def _under(self, kernel: Tensor) -> Tensor:
        (r, c), (a, b) = self.offset, self.small.shape[-2:]
        return kernel[:, :, r:r + a, c:c + b]

    def add_to(self, kernel: Tensor) -> None:
        self._under(kernel).addcmul_(per_channel(self.scale), self.small)

    def grads(self, grad: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        g = self._under(grad)
        return [scaled(g, self.scale, self.small) if wanted[0] else None,
                channel_dot(g, self.small) if wanted[1] else None]
