"""``1x1_kxk``: a 1x1 conv (C -> C, grouped) then a kxk conv (DBB); the kxk may itself grow.

Online, its term :class:`ComposedTerm` merges the two kernels into the block's one kernel, unless running
the branch as its two convolutions is cheaper on this input (small maps: :func:`run_composed_as_convs`,
the block's ``execution`` setting, :mod:`dyrep_fx.execution`).

Its costs per forward, in multiply-adds: merging costs ``C_out * C_mid * C_in * kh * kw / groups**2`` per
step, whatever the batch; the two convolutions cost in proportion to the feature map. Both are the same
linear function of the same parameters.

The term's merge and contractions: ``K = w2 (x) w1`` per group; two contractions, and the scale's gradient
reuses the one for ``w2``. On CPU, without groups, the merge and both contractions run as one 1x1
convolution over ``w2`` read as a batch of ``O`` images (and its two backward convolutions): oneDNN's
convolutions do these multiply-adds 1.6-2x faster than MKL's matrix products with their layout copies
(measured for 128-512 channels; ``einsum`` elsewhere, where nothing was measured).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..assembly import Term, channel_dot, per_channel, scaled
from ..dbb_ops import pointwise_norm
from ..execution import run_as_convs
from ..geometry import ConvGeometry
from .branch import Branch, fuse_with_bn, init_conv, new_bn
from .registry import BranchKind, applies_everywhere, register_kind

__all__ = ["ComposedBranch", "ComposedTerm", "composed_costs", "run_composed_as_convs", "KIND"]


@dataclasses.dataclass(frozen=True)
class ComposedTerm(Term):
    """``scale[o] * sum_t w2[o, t, u, v] * w1[t, i]`` within each of ``groups`` groups."""

    w1: Tensor
    w2: Tensor
    scale: Tensor
    groups: int

    tensors_of = ("w1", "w2", "scale")

    def add_to(self, kernel: Tensor) -> None:
        kernel.addcmul_(per_channel(self.scale), _compose(self.w1, self.w2, self.groups))

    def grads(self, grad: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        w1, w2, scale, groups = self.w1, self.w2, self.scale, self.groups
        if _as_convolution(w2, groups):
            return _grads_by_convolution(grad, w1, w2, scale, wanted)
        g1 = kernels.split_groups(w1[:, :, 0, 0], groups)  # [g, T/g, I]
        g2 = kernels.split_groups(w2, groups)  # [g, O/g, T/g, kh, kw]
        gg = kernels.split_groups(grad, groups)  # [g, O/g, I, kh, kw]
        grad_w1 = grad_w2 = grad_scale = None
        if wanted[0]:
            scaled_w2 = g2 * scale.reshape(groups, -1, 1, 1, 1)
            grad_w1 = torch.einsum("gotuv,goiuv->gti", scaled_w2, gg).reshape(w1.shape)
        if wanted[1] or wanted[2]:
            unscaled = torch.einsum("goiuv,gti->gotuv", gg, g1).reshape(w2.shape)  # d<G, K>/d w2 without scale
            # (einsum's one matrix product leaves ``unscaled`` channels-last; the scaling writes w2's layout)
            grad_w2 = scaled(unscaled, scale, w2) if wanted[1] else None
            grad_scale = channel_dot(unscaled, w2) if wanted[2] else None
        return [grad_w1, grad_w2, grad_scale]


def _as_convolution(w2: Tensor, groups: int) -> bool:
    """Whether the merge runs as a convolution (see the module docstring)."""
    return groups == 1 and w2.device.type == "cpu"


def _compose(w1: Tensor, w2: Tensor, groups: int) -> Tensor:
    """``K[o, i] = sum_t w2[o, t] * w1[t, i]`` per tap and group (``kernels.merge_1x1_kxk``'s kernel)."""
    if not _as_convolution(w2, groups):
        return kernels.merge_1x1_kxk(w1, None, w2, None, groups)[0]
    # w2 as O images of T channels, w1 transposed as I filters of T channels: out[o, i, u, v] = K[o, i, u, v]
    return F.conv2d(w2, w1[:, :, 0, 0].t().unsqueeze(-1).unsqueeze(-1))


def _grads_by_convolution(grad: Tensor, w1: Tensor, w2: Tensor, scale: Tensor,
                          wanted: Sequence[bool]) -> list[Tensor | None]:
    """The gradients of :func:`_compose`'s convolution: ``d w2`` is its input gradient (a 1x1 convolution of
    ``G`` with ``w1``), ``d w1`` its weight gradient (with ``G`` scaled per output channel)."""
    grad_w1 = grad_w2 = grad_scale = None
    if wanted[0]:
        t, i = w1.shape[:2]
        scaled_grad = grad * per_channel(scale)
        grad_w1 = torch.nn.grad.conv2d_weight(w2, (i, t, 1, 1), scaled_grad).reshape(i, t).t()
        grad_w1 = grad_w1.unsqueeze(-1).unsqueeze(-1)
    if wanted[1] or wanted[2]:
        unscaled = F.conv2d(grad, w1)  # d<G, K>/d w2 without scale
        grad_w2 = scaled(unscaled, scale, w2) if wanted[1] else None
        grad_scale = channel_dot(unscaled, w2) if wanted[2] else None
    return [grad_w1, grad_w2, grad_scale]


def composed_costs(geom: ConvGeometry, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Multiply-adds per forward of the branch: ``(merged into the kernel, run as two convs)``.

    ``input_shape`` is the block input's ``(N, C, H, W)``. The 1x1 runs on the unpadded input and the
    padding moves to the kxk (see :meth:`ComposedBranch.forward`), which on maps smaller than its window
    runs only the taps that read them (:meth:`~dyrep_fx.geometry.ConvGeometry.taps_run`); backward costs
    about twice forward in both ways.
    """
    n, _, h, w = input_shape
    (kh, kw), g = geom.kernel_size, geom.groups
    th, tw = geom.taps_run((h, w))
    c_in, c_mid, c_out = geom.in_channels, geom.in_channels, geom.out_channels
    ho, wo = geom.output_size((h, w))
    merged = c_out * (c_mid // g) * (c_in // g) * kh * kw
    convs = n * h * w * c_mid * (c_in // g) + n * ho * wo * c_out * (c_mid // g) * th * tw
    return merged, convs


def run_composed_as_convs(geom: ConvGeometry, input_shape: tuple[int, ...], execution: str = "auto") -> bool:
    """Whether an online branch of this kind should run as convolutions on this input (else merge it)."""
    return run_as_convs(*composed_costs(geom, input_shape), execution)


class ComposedBranch(Branch):
    """``1x1_kxk``: a 1x1 conv then a kxk conv, each bias-free (then a BatchNorm each in dbb mode).

    In dbb mode the intermediate map is the 1x1's output on the padded input, BatchNorm included, so
    its border holds the 1x1's (BatchNorm) bias, which is DBB's pad-with-bias condition and keeps the
    merge exact. It is computed from the 1x1 on the unpadded input (see :mod:`dyrep_fx.kinds.branch`).
    """

    kind = "1x1_kxk"

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        mid = geom.in_channels
        self.conv1 = init_conv(nn.Conv2d(geom.in_channels, mid, 1, 1, 0, 1, geom.groups, bias=False,
                                         device=like.device, dtype=like.dtype))
        self.conv2 = init_conv(nn.Conv2d(mid, geom.out_channels, geom.kernel_size, geom.stride, 0,
                                         geom.dilation, geom.groups, bias=False,
                                         device=like.device, dtype=like.dtype))
        if mode == "dbb":
            self.bn1 = new_bn(mid, 1.0, like)

    def inner_kernel(self) -> tuple[Tensor, Tensor | None]:
        """The kxk stage's equivalent kernel (a grown inner block reports its own)."""
        if hasattr(self.conv2, "equivalent"):
            return self.conv2.equivalent()
        return self.conv2.weight, None

    def raw_kernel(self) -> Tensor:
        w2, _ = self.inner_kernel()  # an online inner block has no bias
        return kernels.merge_1x1_kxk(self.conv1.weight, None, w2, None, self.geom.groups)[0]

    def inner_convs(self) -> dict[str, nn.Module]:
        return {"conv2": self.conv2}

    @classmethod
    def inner_geometries(cls, geom: ConvGeometry) -> dict[str, ConvGeometry]:
        # the kxk stage reads the padded intermediate map: the outer window, unpadded
        return {"conv2": ConvGeometry.from_conv(nn.Conv2d(
            geom.in_channels, geom.out_channels, geom.kernel_size, geom.stride, 0, geom.dilation, geom.groups,
            bias=False, device="meta"))}

    def runs_apart(self, shape: tuple[int, ...], execution: str) -> bool:
        return run_composed_as_convs(self.geom, shape, execution)

    def term(self) -> Term:
        return ComposedTerm(self.conv1.weight, self.inner_kernel()[0], self.scale, self.geom.groups)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w1, b1 = fuse_with_bn(self.conv1.weight, None, self.bn1)
        w2, b2 = self.inner_kernel()
        w, b = kernels.merge_1x1_kxk(w1, b1, w2, b2, self.geom.groups)
        return fuse_with_bn(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        nested = hasattr(self.conv2, "equivalent")  # a grown inner block: a conv without padding of its own
        if self.mode == "dbb":
            zp = pointwise_norm(self.bn1, x, self.conv1.weight, self.geom, recompute=recompute)
            return self.bn(self.conv2(zp) if nested else self.geom.conv_valid(zp, self.conv2.weight))
        # (a bias-free 1x1 on the unpadded input: it commutes with the block's padding, any mode)
        z = F.conv2d(x, self.conv1.weight, None, 1, 0, 1, self.geom.groups)
        # Online: the branch runs apart on small feature maps (see dyrep_fx.execution). It is linear, so the
        # padding moves past the 1x1 (into the kxk conv itself, which then keeps the unpadded map for
        # backward) and ``scale`` goes on the kxk kernel or on the output, whichever is smaller (on the
        # small maps this runs on, the output often is: one pass over it instead of the kernel).
        if nested:
            return self.scale.reshape(1, -1, 1, 1) * self.conv2(self.geom.pad_input(z))
        w2 = self.conv2.weight
        ho, wo = self.geom.output_size((z.shape[-2], z.shape[-1]))
        if z.shape[0] * self.geom.out_channels * ho * wo < w2.numel():
            return self.geom.conv(z, w2, None) * self.scale.reshape(1, -1, 1, 1)
        return self.geom.conv(z, self.scale.reshape(-1, 1, 1, 1) * w2, None)


#: DBB's, OREPA's and DyRep's.
KIND = register_kind(BranchKind(ComposedBranch.kind, ComposedBranch, applies_everywhere, 20,
                                frozenset({"dbb", "orepa", "dyrep"})))
