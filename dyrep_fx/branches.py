"""The branch kinds a :class:`~dyrep_fx.block.RepConv2d` can carry beside its main kernel.

Each branch is a small module that knows two things about itself:

* ``kernel()``: its exact equivalent ``(W, b)`` in the block's own ``kh x kw`` window (eval mode);
* ``forward(x, xp, recompute)``: the feature-map computation used in ``dbb`` mode, on the block input ``x``
  and the block's explicitly padded input ``xp`` (``1x1_kxk`` also in online mode, see
  :mod:`dyrep_fx.execution`). ``xp`` is ``None`` when the conv pads with zeros (:func:`pads_with_zeros`).

Memory: a branch saves no more for backward than a plain DBB block does. With zero padding no branch
reads a padded copy of the input: window convolutions pad (or crop) inside the convolution, and a 1x1
stage runs on the unpadded input, since a 1x1 conv without bias maps the padding to itself (zeros to
zeros, reflected pixels to reflected outputs), and its output is padded after it. In dbb mode the 1x1
stage's BatchNorm normalises that padded map as before (same statistics, same function) and keeps the
unpadded map, not the padded one (:class:`_PaddedMapBatchNorm`); the fixed average / prior filter keeps
nothing of its input (:class:`_FixedFilter`; DBB's average pooling keeps it). With the block's
``recompute`` set, every 1x1 stage (the 1x1 branch, the first stage of ``1x1_kxk``, ``1x1_avg`` and
``prior``) keeps only its input, which the block keeps anyway, and runs its conv again in backward
(:class:`_PointwiseNorm`).

Modes:

* ``online`` (OREPA): the branch is linear and bias-free, scaled per output channel by ``scale``;
  the block adds ``scale * raw_kernel()`` into one kernel and runs one convolution.
* ``dbb`` (DBB / DyRep): the branch ends in its own BatchNorm ``bn`` whose ``weight`` is the scale.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .assembly import ComposedTerm, FilterTerm, Term, WindowTerm
from .geometry import ConvGeometry

__all__ = ["Branch", "make_branch", "BRANCH_CLASSES", "pads_with_zeros"]


def _init_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # He-normal, fan-out, as DyRep initialises new branches.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _new_bn(channels: int, gamma: float, like: Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        bn.weight.fill_(gamma)
    return bn


def _fuse(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    return kernels.fuse_bn(weight, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def pads_with_zeros(geom: ConvGeometry) -> bool:
    """Whether the conv pads with zeros: then its branches read the unpadded input (``xp`` is ``None``)."""
    return geom.same_from_input or geom.padding_mode == "zeros"


def _pointwise(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """A bias-free 1x1 conv on the unpadded input (it commutes with the block's padding, any mode)."""
    return nn.functional.conv2d(x, weight, None, 1, 0, 1, groups)


def _window_edges(geom: ConvGeometry, map_size: tuple[int, int], size: tuple[int, int],
                  offset: tuple[int, int]) -> list[int]:
    """Top, bottom, left and right edge of a ``size`` kernel's window at ``offset`` relative to the unpadded
    map: positive pads it, negative crops it."""
    (top, bottom), (left, right) = geom.pads_for(map_size)
    (kh, kw), (dh, dw) = geom.kernel_size, geom.dilation
    return [top - offset[0] * dh, bottom - (kh - size[0] - offset[0]) * dh,
            left - offset[1] * dw, right - (kw - size[1] - offset[1]) * dw]


def _window_conv(geom: ConvGeometry, x: Tensor, weight: Tensor, size: tuple[int, int],
                 offset: tuple[int, int]) -> Tensor:
    """``geom.window(zero-padded x)`` convolved with ``weight``, without a padded copy of ``x`` where possible.

    The window's edges, relative to ``x``, are the block's pads less the taps the ``size`` kernel skips:
    a negative one crops ``x`` (a view), and equal ones on both sides go to the convolution itself,
    which then keeps ``x`` for backward (the layer before keeps it anyway).
    """
    edges = _window_edges(geom, (x.shape[-2], x.shape[-1]), size, offset)
    crop_t, crop_b, crop_l, crop_r = (max(-e, 0) for e in edges)
    x = x[..., crop_t: x.shape[-2] - crop_b, crop_l: x.shape[-1] - crop_r]
    pad_t, pad_b, pad_l, pad_r = (max(e, 0) for e in edges)
    if pad_t == pad_b and pad_l == pad_r:
        return nn.functional.conv2d(x, weight, None, geom.stride, (pad_t, pad_l), geom.dilation, geom.groups)
    return geom.conv_valid(nn.functional.pad(x, (pad_l, pad_r, pad_t, pad_b)), weight)


def _col(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def _channel_stats(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``z`` over ``(N, H, W)``.

    Taken from the native BatchNorm kernel, which is several times faster on CPU than ``torch.var_mean``
    over these dimensions (3.6 vs 1.0 ms for a ``[8, 64, 56, 56]`` map); it returns ``1 / sqrt(var + eps)``,
    so the variance comes back to within rounding of ``var + eps`` (float32: ~1e-7 of it, which is all
    the normalisation ever reads).
    """
    _, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(z, None, None, True, 0.0, eps)
    return mean, (invstd.pow(-2) - eps).clamp_min(0.0)


def _padded_norm(z: Tensor, weight: Tensor, bias: Tensor, pads: tuple, eps: float):
    """Train-mode BatchNorm of ``z`` zero-padded by ``pads``, statistics over the padded map: the padded
    output and the batch mean, biased variance and inverse std. The border is zero before normalisation,
    so its share of every sum is known and the padded map is never built."""
    (top, bottom), (left, right) = pads
    n, c, h, w = z.shape
    if top == bottom == left == right == 0:  # a plain BatchNorm: the native kernel does it all
        out, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(z, weight, bias, True, 0.0, eps)
        return out, mean, (invstd.pow(-2) - eps).clamp_min(0.0), invstd
    hp, wp = h + top + bottom, w + left + right
    share = (h * w) / (hp * wp)  # of the padded map that is z; the rest is zero
    mean_z, var_z = _channel_stats(z, eps)
    mean = mean_z * share
    var = var_z * share + mean_z.square() * (share * (1.0 - share))  # both terms >= 0: no cancellation
    invstd = torch.rsqrt(var + eps)
    a = weight * invstd
    b = bias - mean * a
    # Every pixel starts at the border value b; the interior adds a * z in place (torch.compile refuses
    # writing there through ``out=``; as many passes as a BatchNorm then a pad).
    out = z.new_empty(n, c, hp, wp).copy_(_col(b).expand(n, c, hp, wp))
    out[:, :, top:top + h, left:left + w].addcmul_(z, _col(a))
    return out, mean, var, invstd


def _padded_norm_grads(grad: Tensor, z: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, pads: tuple):
    """Gradients of :func:`_padded_norm` for ``z``, ``weight`` and ``bias``."""
    (top, bottom), (left, right) = pads
    n, _, h, w = z.shape
    count = n * (h + top + bottom) * (w + left + right)
    g_in = grad[:, :, top:top + h, left:left + w]
    sum_g = grad.sum((0, 2, 3))
    grad_weight = ((g_in * z).sum((0, 2, 3)) - mean * sum_g) * invstd  # sum of g * x_hat, border included
    # dz = a * (g - sum_g / count - x_hat * grad_weight / count) on the interior, x_hat = (z - mean) * invstd
    a = weight * invstd
    k1 = -a * invstd * grad_weight / count
    k0 = -a * sum_g / count - k1 * mean
    grad_z = (g_in * _col(a)).addcmul_(z, _col(k1)).add_(_col(k0))
    return grad_z, grad_weight, sum_g


class _PaddedMapBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm of ``z`` zero-padded by ``pads``, statistics over the padded map, keeping only ``z``
    for backward (not the padded map). Equals ``F.batch_norm(F.pad(z, pads), None, None, weight, bias, True,
    0, eps)``; returns the padded output and the batch mean and biased variance (not differentiable) for
    the running statistics. Sums run in the parameters' precision, as a native BatchNorm's do under autocast.
    """

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor, bias: Tensor, pads: tuple, eps: float):
        out, mean, var, invstd = _padded_norm(z.to(weight.dtype), weight, bias, pads, eps)
        ctx.save_for_backward(z, weight, mean, invstd)
        ctx.pads = pads
        ctx.mark_non_differentiable(mean, var)
        return out.to(z.dtype), mean, var  # (in z's dtype, as a native BatchNorm's output under autocast)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _mean: Tensor, _var: Tensor):
        z, weight, mean, invstd = ctx.saved_tensors
        grad_z, grad_weight, grad_bias = _padded_norm_grads(grad.to(weight.dtype), z.to(weight.dtype), weight, mean,
                                                            invstd, ctx.pads)
        needs = ctx.needs_input_grad
        return (grad_z.to(z.dtype) if needs[0] else None, grad_weight if needs[1] else None,
                grad_bias if needs[2] else None, None, None)


class _PointwiseNorm(torch.autograd.Function):
    """``BatchNorm(pad(conv1x1(x)))`` in train mode, statistics over the zero-padded map, keeping only ``x``
    (a block's ``recompute`` setting).

    Equals ``F.batch_norm(F.pad(F.conv2d(x, w, None, stride, 0, 1, groups), pads), None, None, weight, bias,
    True, 0, eps)``. Backward recomputes the 1x1 conv from ``x``, which the block's other convolutions keep
    anyway: a DBB block keeps the conv's output map (and in the padded branches a padded one) until
    backward, this keeps nothing of the map's size, for a 1x1 conv's forward again in backward (a ninth of
    a 3x3 conv's multiply-adds). Returns the padded output and the batch mean and biased variance (not
    differentiable) for the running statistics. Under autocast the conv runs (and is recomputed) in the
    dtype autocast gave it; the norm's sums run in the parameters' precision, as a native BatchNorm's do.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, weight: Tensor, bias: Tensor, stride: tuple, groups: int, pads: tuple,
                eps: float):
        z = F.conv2d(x, w, None, stride, 0, 1, groups)
        out, mean, var, invstd = _padded_norm(z.to(weight.dtype), weight, bias, pads, eps)
        ctx.save_for_backward(x, w, weight, mean, invstd)
        ctx.conv, ctx.pads, ctx.z_dtype = (stride, groups), pads, z.dtype
        ctx.mark_non_differentiable(mean, var)
        return out.to(z.dtype), mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _mean: Tensor, _var: Tensor):
        x, w, weight, mean, invstd = ctx.saved_tensors
        (stride, groups), dt = ctx.conv, ctx.z_dtype
        xc, wc = x.to(dt), w.to(dt)  # what the forward's conv ran on (autocast's cast, or nothing)
        z = F.conv2d(xc, wc, None, stride, 0, 1, groups)
        grad_z, grad_weight, grad_bias = _padded_norm_grads(grad.to(weight.dtype), z.to(weight.dtype), weight,
                                                            mean, invstd, ctx.pads)
        needs = ctx.needs_input_grad
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_z.to(dt), xc, wc, None, list(stride), [0, 0], [1, 1], False, [0, 0], groups,
            [needs[0], needs[1], False])
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(w.dtype),
                grad_weight if needs[2] else None, grad_bias if needs[3] else None, None, None, None, None)


class _FixedFilter(torch.autograd.Function):
    """A depthwise convolution by a fixed filter that keeps nothing of its input for backward.

    ``F.conv2d`` keeps its input for the weight's gradient even when the weight needs none; the input's
    gradient needs only the filter. (DBB's average pooling keeps its input too.)
    """

    @staticmethod
    def forward(ctx, zp: Tensor, filt: Tensor, stride: tuple, dilation: tuple) -> Tensor:
        out = F.conv2d(zp, filt, None, stride, 0, dilation, filt.shape[0])
        ctx.save_for_backward(filt)
        ctx.geometry, ctx.input = (stride, dilation), (tuple(zp.shape), zp.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (filt,) = ctx.saved_tensors
        (stride, dilation), (shape, dtype) = ctx.geometry, ctx.input
        grad_zp = torch.nn.grad.conv2d_input(shape, filt.to(grad.dtype), grad, stride, 0, dilation, filt.shape[0])
        return grad_zp.to(dtype), None, None, None


def _fixed_filter(zp: Tensor, spatial: Tensor, geom: ConvGeometry) -> Tensor:
    """``zp`` convolved per channel with the fixed ``spatial`` filter (valid, the block's stride and dilation)."""
    filt = spatial.unsqueeze(1)
    if torch.compiler.is_compiling() or not zp.requires_grad:
        return geom.conv_valid(zp, filt, groups=filt.shape[0])
    return _FixedFilter.apply(zp, filt, geom.stride, geom.dilation)


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """What ``nn.BatchNorm2d`` does to its running statistics in a training forward (unbiased variance)."""
    if bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        bn.running_var.mul_(1.0 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)


#: torch's registries of hooks on every module (``register_module_forward_pre_hook`` and the like).
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks")


def _observed(bn: nn.Module) -> bool:
    """Whether forward hooks watch ``bn`` (its own or every module's): then it must run as a module."""
    registries = [getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS]
    return bool(bn._forward_pre_hooks or bn._forward_hooks or any(registries))


def _pointwise_norm(bn: nn.Module, x: Tensor, weight: Tensor, geom: ConvGeometry, stride: tuple[int, int] = (1, 1),
                    padded: bool = True, recompute: bool = False) -> Tensor:
    """``bn(pad(conv1x1(x)))``: a 1x1 stage (bias-free, ``geom.groups``) and its norm, over the map padded by
    the block's padding when ``padded``.

    A plain ``nn.BatchNorm2d`` training on a zero-padded map runs as :class:`_PaddedMapBatchNorm`, which
    keeps the conv's output for backward, not the padded map; with ``recompute``, stage and norm run as
    :class:`_PointwiseNorm`, which keeps only ``x`` and runs the 1x1 conv again in backward. Same
    statistics, same function. Everything else runs as written: eval mode, other padding modes, other
    norm classes (a SyncBatchNorm, whose statistics span ranks), a norm that forward hooks watch (they see
    the padded map as its input), and under ``torch.compile`` the compiler decides what to keep.
    """
    pads = geom.pads_for((x.shape[-2], x.shape[-1])) if padded else ((0, 0), (0, 0))
    plain = type(bn) is nn.BatchNorm2d and bn.affine and bn.training and (pads_with_zeros(geom) or not padded)
    fast = plain and not _observed(bn) and not torch.compiler.is_compiling()
    if fast and recompute:
        out, mean, var = _PointwiseNorm.apply(x, weight, bn.weight, bn.bias, tuple(stride), geom.groups, pads,
                                              bn.eps)
    else:
        z = F.conv2d(x, weight, None, stride, 0, 1, geom.groups)
        if not fast or pads == ((0, 0), (0, 0)):
            return bn(geom.pad_input(z) if padded else z)
        out, mean, var = _PaddedMapBatchNorm.apply(z, bn.weight, bn.bias, pads, bn.eps)
    _update_running_stats(bn, mean, var, out.numel() // out.shape[1])
    return out


class Branch(nn.Module):
    """Base class: holds the block geometry and the branch's scale (``scale`` or ``bn.weight``)."""

    kind: ClassVar[str] = ""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__()
        self.geom = geom
        self.mode = mode
        if mode == "online":
            self.scale = nn.Parameter(torch.full((geom.out_channels,), float(init_scale),
                                                 device=like.device, dtype=like.dtype))
        else:
            self.bn = _new_bn(geom.out_channels, init_scale, like)

    def raw_kernel(self) -> Tensor:
        """The branch's unscaled linear kernel in the block window (online mode)."""
        raise NotImplementedError

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


class _WindowConvBranch(Branch):
    """A single conv of a sub-window (``size``) of the block window: the 1x1, 1xk and kx1 kinds."""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.size = self.window_size(geom)
        self.offset = geom.centre(self.size)
        self.conv = _init_conv(nn.Conv2d(geom.in_channels, geom.out_channels, self.size, geom.stride, 0,
                                         geom.dilation, geom.groups, bias=False,
                                         device=like.device, dtype=like.dtype))

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        raise NotImplementedError

    def raw_kernel(self) -> Tensor:
        return kernels.embed_kernel(self.conv.weight, self.geom.kernel_size, self.offset)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w, b = _fuse(self.conv.weight, None, self.bn)
        return kernels.embed_kernel(w, self.geom.kernel_size, self.offset), b

    def term(self) -> Term:
        return WindowTerm(self.conv.weight, self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        if xp is None:
            if recompute and self.size == (1, 1) and not any(_window_edges(self.geom, x.shape[-2:], self.size,
                                                                           self.offset)):
                # the centred 1x1 reads the input as it is: a 1x1 stage (see _pointwise_norm)
                return _pointwise_norm(self.bn, x, self.conv.weight, self.geom, self.geom.stride, False, True)
            return self.bn(_window_conv(self.geom, x, self.conv.weight, self.size, self.offset))
        window = self.geom.window(xp, self.size, self.offset)
        return self.bn(self.geom.conv_valid(window, self.conv.weight))


class PointwiseBranch(_WindowConvBranch):
    """``1x1``: a 1x1 conv at the centre tap of the window."""

    kind = "1x1"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (1, 1)


class RowBranch(_WindowConvBranch):
    """``1xk``: a 1 x kw conv on the centre row of the window (ACNet)."""

    kind = "1xk"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (1, geom.kernel_size[1])


class ColumnBranch(_WindowConvBranch):
    """``kx1``: a kh x 1 conv on the centre column of the window (ACNet)."""

    kind = "kx1"

    @staticmethod
    def window_size(geom: ConvGeometry) -> tuple[int, int]:
        return (geom.kernel_size[0], 1)


class IdentityBranch(Branch):
    """``identity``: the input itself (RepVGG); in dbb mode a bare BatchNorm on the input."""

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
        return _fuse(self.eye, None, self.bn)

    def term(self) -> Term:
        (r, c) = self.offset
        return WindowTerm(self.eye[:, :, r:r + 1, c:c + 1], self.scale, self.offset)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        return self.bn(x)


class ComposedBranch(Branch):
    """``1x1_kxk``: a 1x1 conv (C -> C, grouped) then a kxk conv (DBB); the kxk may itself grow.

    In dbb mode the intermediate map is the 1x1's output on the padded input, BatchNorm included, so
    its border holds the 1x1's (BatchNorm) bias, which is DBB's pad-with-bias condition and keeps the
    merge exact. It is computed from the 1x1 on the unpadded input (see the module docstring).
    """

    kind = "1x1_kxk"

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        mid = geom.in_channels
        self.conv1 = _init_conv(nn.Conv2d(geom.in_channels, mid, 1, 1, 0, 1, geom.groups, bias=False,
                                          device=like.device, dtype=like.dtype))
        self.conv2 = _init_conv(nn.Conv2d(mid, geom.out_channels, geom.kernel_size, geom.stride, 0,
                                          geom.dilation, geom.groups, bias=False,
                                          device=like.device, dtype=like.dtype))
        if mode == "dbb":
            self.bn1 = _new_bn(mid, 1.0, like)

    def inner_kernel(self) -> tuple[Tensor, Tensor | None]:
        """The kxk stage's equivalent kernel (a grown inner block reports its own)."""
        if hasattr(self.conv2, "equivalent"):
            return self.conv2.equivalent()
        return self.conv2.weight, None

    def raw_kernel(self) -> Tensor:
        w2, _ = self.inner_kernel()  # an online inner block has no bias
        return kernels.merge_1x1_kxk(self.conv1.weight, None, w2, None, self.geom.groups)[0]

    def term(self) -> Term:
        return ComposedTerm(self.conv1.weight, self.inner_kernel()[0], self.scale, self.geom.groups)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w1, b1 = _fuse(self.conv1.weight, None, self.bn1)
        w2, b2 = self.inner_kernel()
        w, b = kernels.merge_1x1_kxk(w1, b1, w2, b2, self.geom.groups)
        return _fuse(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        nested = hasattr(self.conv2, "equivalent")  # a grown inner block: a conv without padding of its own
        if self.mode == "dbb":
            zp = _pointwise_norm(self.bn1, x, self.conv1.weight, self.geom, recompute=recompute)
            return self.bn(self.conv2(zp) if nested else self.geom.conv_valid(zp, self.conv2.weight))
        z = _pointwise(x, self.conv1.weight, self.geom.groups)
        # Online: the online block's execution on small feature maps (see dyrep_fx.execution). The branch is
        # linear, so the padding moves past the 1x1 (into the kxk conv itself, which then keeps the unpadded
        # map for backward) and ``scale`` goes on the kxk kernel or on the output, whichever is smaller
        # (on the small maps this runs on, the output often is: one pass over it instead of the kernel).
        if nested:
            return self.scale.reshape(1, -1, 1, 1) * self.conv2(self.geom.pad_input(z))
        w2 = self.conv2.weight
        ho, wo = self.geom.output_size((z.shape[-2], z.shape[-1]))
        if z.shape[0] * self.geom.out_channels * ho * wo < w2.numel():
            return self.geom.conv(z, w2, None) * self.scale.reshape(1, -1, 1, 1)
        return self.geom.conv(z, self.scale.reshape(-1, 1, 1, 1) * w2, None)


class _SpatialFilterBranch(Branch):
    """A 1x1 conv (C_in -> C_out, grouped) then a fixed per-channel filter over the window."""

    def __init__(self, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> None:
        super().__init__(geom, mode, init_scale, like)
        self.conv1 = _init_conv(nn.Conv2d(geom.in_channels, geom.out_channels, 1, 1, 0, 1, geom.groups,
                                          bias=False, device=like.device, dtype=like.dtype))
        self.register_buffer("spatial", self.make_filter(geom).to(like), persistent=False)
        if mode == "dbb":
            self.bn1 = _new_bn(geom.out_channels, 1.0, like)

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        raise NotImplementedError

    def raw_kernel(self) -> Tensor:
        return kernels.merge_1x1_depthwise(self.conv1.weight, None, self.spatial)[0]

    def term(self) -> Term:
        return FilterTerm(self.conv1.weight, self.scale, self.spatial)

    def dbb_kernel(self) -> tuple[Tensor, Tensor]:
        w1, b1 = _fuse(self.conv1.weight, None, self.bn1)
        w, b = kernels.merge_1x1_depthwise(w1, b1, self.spatial)
        return _fuse(w, b, self.bn)

    def forward(self, x: Tensor, xp: Tensor | None, recompute: bool = False) -> Tensor:
        zp = _pointwise_norm(self.bn1, x, self.conv1.weight, self.geom, recompute=recompute)
        return self.bn(_fixed_filter(zp, self.spatial, self.geom))


class AvgBranch(_SpatialFilterBranch):
    """``1x1_avg``: a 1x1 conv then average pooling over the window (DBB)."""

    kind = "1x1_avg"

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        kh, kw = geom.kernel_size
        return torch.full((geom.out_channels, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)


class PriorBranch(_SpatialFilterBranch):
    """``prior``: a 1x1 conv then a fixed DCT frequency filter per channel (OREPA)."""

    kind = "prior"

    @staticmethod
    def make_filter(geom: ConvGeometry) -> Tensor:
        return kernels.frequency_prior(geom.out_channels, geom.kernel_size, dtype=torch.float64)


BRANCH_CLASSES: dict[str, type[Branch]] = {
    cls.kind: cls
    for cls in (PointwiseBranch, ComposedBranch, AvgBranch, RowBranch, ColumnBranch, IdentityBranch, PriorBranch)
}


def make_branch(kind: str, geom: ConvGeometry, mode: str, init_scale: float, like: Tensor) -> Branch:
    """Build a new, randomly initialised branch of ``kind`` for a block of geometry ``geom``."""
    return BRANCH_CLASSES[kind](geom, mode, init_scale, like)
