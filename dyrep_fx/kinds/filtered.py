"""``FilteredBranch``: a 1x1 conv then a fixed per-channel filter over the window, the base of the ``1x1_avg``
and ``prior`` kinds (each sets only its filter), and its online term, :class:`FilterTerm`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import kernels
from ..assembly import Term, channel_dot, per_channel, scaled
from ..dbb_ops import fixed_filter, pointwise_norm
from ..geometry import ConvGeometry
from .branch import Branch, fuse_with_bn, init_conv, new_bn

__all__ = ["FilteredBranch", "FilterTerm"]


@dataclasses.dataclass(frozen=True)
class FilterTerm(Term):
    """``scale[o] * w1[o, i] * spatial[o, u, v]`` (``w1``: ``[O, I, 1, 1]``, ``spatial`` fixed).

    All filter terms of one kernel are added in one batched product and share one contraction of the
    kernel's gradient with their filters (:meth:`add_all`, :meth:`grads_all`)."""

    w1: Tensor
    scale: Tensor
    spatial: Tensor

    tensors_of = ("w1", "scale", "spatial")

    def add_to(self, kernel: Tensor) -> None:
        kernel.addcmul_(per_channel(self.scale) * self.w1, self.spatial.unsqueeze(1))

    def grads(self, grad: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        return self.grads_all(grad, [self], [wanted])[0]

    @classmethod
    def add_all(cls, kernel: Tensor, terms: Sequence[FilterTerm]) -> None:
        if not kernel.is_contiguous():  # (a channels-last kernel has no [O, I, kh*kw] view)
            super().add_all(kernel, terms)
            return
        # one pass over the kernel: K[o, i, :] += sum_f (scale_f[o] * w1_f[o, i]) * spatial_f[o, :]
        coeffs = torch.stack([per_channel(t.scale).flatten(1) * t.w1.flatten(1) for t in terms], -1)
        kernel.view(*coeffs.shape[:2], -1).baddbmm_(coeffs, _stack(terms))

    @classmethod
    def grads_all(cls, grad: Tensor, terms: Sequence[FilterTerm],
                  wanted: Sequence[Sequence[bool]]) -> list[list[Tensor | None]]:
        # <G, spatial_f> per (o, i) for every filter term in one batched product: G is read once
        contracted = torch.bmm(grad.reshape(*grad.shape[:2], -1), _stack(terms).transpose(1, 2))
        out = []
        for f, (term, want) in enumerate(zip(terms, wanted)):
            g = contracted[..., f].reshape(term.w1.shape)
            out.append([scaled(g, term.scale, term.w1) if want[0] else None,
                        channel_dot(g, term.w1) if want[1] else None, None])
        return out


def _stack(terms: Sequence[FilterTerm]) -> Tensor:
    """The terms' fixed filters as ``[O, F, kh * kw]``."""
    return torch.stack([t.spatial.flatten(1) for t in terms], 1)


class FilteredBranch(Branch):
    """A 1x1 conv (C_in -> C_out, grouped) then the fixed per-channel filter ``make_filter(geom)``."""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.conv1 = init_conv(nn.Conv2d(geom.in_channels, geom.out_channels, 1, 1, 0, 1, geom.groups,
                                         bias=False, device=like.device, dtype=like.dtype))
        self.register_buffer("spatial", self.make_filter(geom).to(like), persistent=False)
        if mode == "dbb":
            self.bn1 = new_bn(geom.out_channels, 1.0, like)

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        """The fixed filter ``[C_out, kh, kw]`` of a block of ``geom`` (made in float64)."""
        raise NotImplementedError

    def raw_kernel(self) -> Tensor:
        return kernels.merge_1x1_depthwise(self.conv1.weight, None, self.spatial)[0]

    def term(self) -> Term:
        return FilterTerm(self.conv1.weight, self.scale, self.spatial)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w1, b1 = fuse_with_bn(self.conv1.weight, None, self.bn1)
        w, b = kernels.merge_1x1_depthwise(w1, b1, self.spatial)
        return fuse_with_bn(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        zp = pointwise_norm(self.bn1, x, self.conv1.weight, self.geom, recompute=recompute)
        return self.bn(fixed_filter(zp, self.spatial, self.geom))
