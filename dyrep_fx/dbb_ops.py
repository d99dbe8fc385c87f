"""dbb-mode feature-map stages that keep less for backward than their plain modules, same function.

A dbb block's branches are convolutions and BatchNorms over the feature map, and autograd keeps what
each module needs: a BatchNorm its input, a convolution its input even when its weight needs no
gradient. Three stages keep less:

* :class:`_PaddedMapBatchNorm`: a 1x1 stage's BatchNorm over its output padded by the block's padding
  (DBB's pad-with-bias condition) keeps the unpadded map, not the padded one;
* :class:`_FixedFilter`: a fixed per-channel filter (an average, a frequency prior) keeps nothing of its input;
* :class:`_PointwiseNorm` (a block's ``recompute`` setting): a 1x1 stage and its norm keep only the
  stage's input, which the block keeps anyway, and run the 1x1 conv again in backward.

Each equals its plain formulation in value, gradients and running statistics (tests/test_memory.py);
:func:`pointwise_norm` falls back to the plain modules wherever that cannot be guaranteed cheaply. And
:func:`window_conv` runs a conv of a sub-window of the block's window on the unpadded input, padding (or
cropping) inside the convolution instead of keeping a padded copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .geometry import ConvGeometry

__all__ = ["pads_with_zeros", "pointwise_norm", "fixed_filter", "window_edges", "window_conv"]


def pads_with_zeros(geom: ConvGeometry) -> bool:
    """Whether the conv pads with zeros: then its branches read the unpadded input (``xp`` is ``None``)."""
    return geom.same_from_input or geom.padding_mode == "zeros"


def window_edges(geom: ConvGeometry, map_size: tuple[int, int], size: tuple[int, int],
                 offset: tuple[int, int]) -> list[int]:
    """Top, bottom, left and right edge of a ``size`` kernel's window at ``offset`` relative to the unpadded
    map: positive pads it, negative crops it."""
    (top, bottom), (left, right) = geom.pads_for(map_size)
    (kh, kw), (dh, dw) = geom.kernel_size, geom.dilation
    return [top - offset[0] * dh, bottom - (kh - size[0] - offset[0]) * dh,
            left - offset[1] * dw, right - (kw - size[1] - offset[1]) * dw]


def window_conv(geom: ConvGeometry, x: Tensor, weight: Tensor, size: tuple[int, int],
                offset: tuple[int, int]) -> Tensor:
    """``geom.window(zero-padded x)`` convolved with ``weight``, without a padded copy of ``x`` where possible.

    The window's edges, relative to ``x``, are the block's pads less the taps the ``size`` kernel skips:
    a negative one crops ``x`` (a view), and equal ones on both sides go to the convolution itself,
    which then keeps ``x`` for backward (the layer before keeps it anyway).
    """
    edges = window_edges(geom, (x.shape[-2], x.shape[-1]), size, offset)
    crop_t, crop_b, crop_l, crop_r = (max(-e, 0) for e in edges)
    x = x[..., crop_t: x.shape[-2] - crop_b, crop_l: x.shape[-1] - crop_r]
    pad_t, pad_b, pad_l, pad_r = (max(e, 0) for e in edges)
    if pad_t == pad_b and pad_l == pad_r:
        return F.conv2d(x, weight, None, geom.stride, (pad_t, pad_l), geom.dilation, geom.groups)
    return geom.conv_valid(F.pad(x, (pad_l, pad_r, pad_t, pad_b)), weight)


def _col(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def _native_norm(z: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Train-mode BatchNorm of ``z`` by the native kernel: the output and the per-channel batch mean,
    biased variance and inverse std over ``(N, H, W)``.

    The native kernel is several times faster on CPU than ``torch.var_mean`` over these dimensions (3.6
    vs 1.0 ms for a ``[8, 64, 56, 56]`` map). It returns ``1 / sqrt(var + eps)``, so the variance comes
    back to within rounding of ``var + eps`` (float32: ~1e-7 of it, which is all a normalisation reads).
    """
    out, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(z, weight, bias, True, 0.0, eps)
    return out, mean, (invstd.pow(-2) - eps).clamp_min(0.0), invstd


def _padded_norm(z: Tensor, weight: Tensor, bias: Tensor, pads: tuple, eps: float):
    """Train-mode BatchNorm of ``z`` zero-padded by ``pads``, statistics over the padded map: the padded
    output and the batch mean, biased variance and inverse std. The border is zero before normalisation,
    so its share of every sum is known and the padded map is never built."""
    (top, bottom), (left, right) = pads
    n, c, h, w = z.shape
    if top == bottom == left == right == 0:  # a plain BatchNorm: the native kernel does it all
        return _native_norm(z, weight, bias, eps)
    hp, wp = h + top + bottom, w + left + right
    share = (h * w) / (hp * wp)  # of the padded map that is z; the rest is zero
    _, mean_z, var_z, _ = _native_norm(z, None, None, eps)  # (z's own statistics; its output is unused)
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


def fixed_filter(zp: Tensor, spatial: Tensor, geom: ConvGeometry) -> Tensor:
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


def pointwise_norm(bn: nn.Module, x: Tensor, weight: Tensor, geom: ConvGeometry, stride: tuple[int, int] = (1, 1),
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
