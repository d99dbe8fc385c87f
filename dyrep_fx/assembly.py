"""Online kernel assembly as one autograd Function: ``W = main_scale * weight + sum_b scale_b * K_b``.

Built from ordinary tensor ops, the sum costs every branch a few kernel-sized temporaries (an embedding
pad, a scaled copy, a sum) in forward, as many again in backward, and autograd keeps several of them
alive until backward. Here the forward adds each term into one kernel in place, and the backward
computes every parameter's gradient straight from the kernel's gradient ``G``:

* main: ``dW = G * main_scale``, ``d main_scale = <G, W>`` per output channel;
* window terms (``1x1``, ``1xk``, ``kx1``, ``identity``): a small kernel at a tap offset; only the
  slice of ``G`` under it is read;
* filter terms (``1x1_avg``, ``prior``): ``K[o,i,u,v] = w1[o,i] * s[o,u,v]``; all of them are added in
  one batched product and share one contraction of ``G`` with their fixed filters ``s``;
* composed terms (``1x1_kxk``): ``K = w2 (x) w1`` per group; two contractions, and the scale's gradient
  reuses the one for ``w2``. On CPU, without groups, the merge and both contractions run as one 1x1
  convolution over ``w2`` read as a batch of ``O`` images (and its two backward convolutions): oneDNN's
  convolutions do these multiply-adds 1.6-2x faster than MKL's matrix products with their layout copies
  (measured for 128-512 channels; ``einsum`` elsewhere, where nothing was measured).

Only the inputs are saved for backward. The result equals the op-by-op sum to rounding (tested with
``gradcheck`` in float64).

Every gradient leaves backward with its input's strides, size-1 dimensions included. The contractions
would otherwise hand back other layouts (``einsum`` returns ``d w2`` channels-last), which costs a copy
twice: autograd's ``AccumulateGrad`` clones a gradient whose layout differs from its parameter's, and
for a 1x1 kernel, whose strides differ only in size-1 dimensions that autograd ignores, DDP copies it
into its bucket each step and warns "Grad strides do not match bucket view strides". The per-channel
scaling every such gradient goes through anyway writes straight into the parameter's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels

__all__ = ["WindowTerm", "FilterTerm", "ComposedTerm", "Term", "assemble_kernel"]


@dataclass(frozen=True)
class WindowTerm:
    """``scale[o] * small[o, i, u, v]`` placed at tap ``offset`` of the kernel window."""

    small: Tensor
    scale: Tensor
    offset: tuple[int, int]


@dataclass(frozen=True)
class FilterTerm:
    """``scale[o] * w1[o, i] * spatial[o, u, v]`` (``w1``: ``[O, I, 1, 1]``, ``spatial`` fixed)."""

    w1: Tensor
    scale: Tensor
    spatial: Tensor


@dataclass(frozen=True)
class ComposedTerm:
    """``scale[o] * sum_t w2[o, t, u, v] * w1[t, i]`` within each of ``groups`` groups."""

    w1: Tensor
    w2: Tensor
    scale: Tensor
    groups: int


Term = WindowTerm | FilterTerm | ComposedTerm

_FIELDS = {WindowTerm: ("small", "scale"), FilterTerm: ("w1", "scale", "spatial"), ComposedTerm: ("w1", "w2", "scale")}


def _col(scale: Tensor) -> Tensor:
    return scale.reshape(-1, 1, 1, 1)


def _scaled(g: Tensor, scale: Tensor, like: Tensor) -> Tensor:
    """``g * scale[o]`` written in ``like``'s layout (the layout change costs no pass of its own)."""
    out = torch.empty_strided(like.shape, like.stride(), dtype=g.dtype, device=g.device)
    return torch.mul(g, _col(scale), out=out)


def _in_layout(g: Tensor | None, like: Tensor) -> Tensor | None:
    """``g`` with exactly ``like``'s strides (see the module docstring for why size-1 dimensions matter)."""
    if g is None or g.stride() == like.stride():
        return g
    if all(n == 1 or a == b for n, a, b in zip(g.shape, g.stride(), like.stride())):
        # Only the strides of size-1 dimensions differ; they address nothing, so relabel without a copy.
        return g.as_strided(like.shape, like.stride())
    return torch.empty_strided(like.shape, like.stride(), dtype=g.dtype, device=g.device).copy_(g)


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum over i, u, v of a[o, ...] * b[o, ...]`` for each ``o``."""
    # A batched matmul of O tiny dot products dispatches one gemv per channel on CPU: far slower.
    return (a * b).flatten(1).sum(1)


def _spec(term: Term) -> tuple[type, tuple[int, int] | None, int]:
    """What backward needs of a term besides its tensors (kept off the tensors, so nothing leaks)."""
    return type(term), getattr(term, "offset", None), getattr(term, "groups", 1)


class _Assemble(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs: tuple, weight: Tensor, main_scale: Tensor, *flat: Tensor) -> Tensor:
        ctx.specs = specs
        ctx.save_for_backward(weight, main_scale, *flat)
        kernel = weight * _col(main_scale)
        filters = []
        for (kind, offset, groups), values in _split(specs, flat):
            if kind is WindowTerm:
                small, scale = values
                (r, c), (a, b) = offset, small.shape[-2:]
                kernel[:, :, r:r + a, c:c + b].addcmul_(_col(scale), small)
            elif kind is FilterTerm:
                filters.append(values)
            else:
                w1, w2, scale = values
                kernel.addcmul_(_col(scale), _compose(w1, w2, groups))
        if filters and kernel.is_contiguous():
            # every filter term in one batched product, one pass over the kernel:
            # K[o, i, :] += sum_f (scale_f[o] * w1_f[o, i]) * spatial_f[o, :]
            coeffs = torch.stack([_col(scale).flatten(1) * w1.flatten(1) for w1, scale, _ in filters], -1)
            kernel.view(*coeffs.shape[:2], -1).baddbmm_(coeffs, _filter_stack(filters))
        else:  # (a channels-last kernel has no [O, I, kh*kw] view)
            for w1, scale, spatial in filters:
                kernel.addcmul_(_col(scale) * w1, spatial.unsqueeze(1))
        return kernel

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        weight, main_scale, *flat = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [None, _scaled(grad, main_scale, weight) if needs[1] else None,
                                      _channel_dot(grad, weight) if needs[2] else None]
        filters = [values for spec, values in _split(ctx.specs, flat) if spec[0] is FilterTerm]
        # <G, spatial_f> per (o, i) for every filter term in one batched product: G is read once
        by_filter = torch.bmm(grad.reshape(*grad.shape[:2], -1), _filter_stack(filters).transpose(1, 2)) if filters else None
        pos, f = 3, 0
        for spec, values in _split(ctx.specs, flat):
            wanted = needs[pos:pos + len(values)]
            if spec[0] is FilterTerm:
                term_grads = _filter_grads(by_filter[..., f], values, wanted)
                f += 1
            else:
                term_grads = _term_grads(spec, grad, values, wanted)
            grads.extend(_in_layout(g, v) for g, v in zip(term_grads, values))
            pos += len(values)
        return tuple(grads)


def _filter_stack(filters: list[Sequence[Tensor]]) -> Tensor:
    """The filter terms' fixed filters as ``[O, F, kh * kw]``."""
    return torch.stack([spatial.flatten(1) for _, _, spatial in filters], 1)


def _filter_grads(contracted: Tensor, values: Sequence[Tensor], wanted: Sequence[bool]) -> list[Tensor | None]:
    """A filter term's gradients from ``<G, spatial>`` per ``(o, i)``."""
    w1, scale, _ = values
    g = contracted.reshape(w1.shape)
    return [_scaled(g, scale, w1) if wanted[0] else None, _channel_dot(g, w1) if wanted[1] else None, None]


def _split(specs: tuple, flat: Sequence[Tensor]):
    """Pair each term's spec with its slice of the flat tensor list."""
    pos = 0
    for spec in specs:
        n = len(_FIELDS[spec[0]])
        yield spec, flat[pos:pos + n]
        pos += n


def _term_grads(spec: tuple, grad: Tensor, values: Sequence[Tensor], wanted: Sequence[bool]) -> list[Tensor | None]:
    """Gradients of one term's tensors (in ``_FIELDS`` order) from the kernel gradient ``grad``."""
    kind, offset, groups = spec
    if kind is WindowTerm:
        small, scale = values
        (r, c), (a, b) = offset, small.shape[-2:]
        g = grad[:, :, r:r + a, c:c + b]
        return [_scaled(g, scale, small) if wanted[0] else None, _channel_dot(g, small) if wanted[1] else None]
    w1, w2, scale = values
    if _as_convolution(w2, groups):
        return _composed_grads_by_convolution(grad, w1, w2, scale, wanted)
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
        grad_w2 = _scaled(unscaled, scale, w2) if wanted[1] else None
        grad_scale = _channel_dot(unscaled, w2) if wanted[2] else None
    return [grad_w1, grad_w2, grad_scale]


def _as_convolution(w2: Tensor, groups: int) -> bool:
    """Whether a composed term's merge runs as a convolution (see the module docstring)."""
    return groups == 1 and w2.device.type == "cpu"


def _compose(w1: Tensor, w2: Tensor, groups: int) -> Tensor:
    """``K[o, i] = sum_t w2[o, t] * w1[t, i]`` per tap and group (``kernels.merge_1x1_kxk``'s kernel)."""
    if not _as_convolution(w2, groups):
        return kernels.merge_1x1_kxk(w1, None, w2, None, groups)[0]
    # w2 as O images of T channels, w1 transposed as I filters of T channels: out[o, i, u, v] = K[o, i, u, v]
    return F.conv2d(w2, w1[:, :, 0, 0].t().unsqueeze(-1).unsqueeze(-1))


def _composed_grads_by_convolution(grad: Tensor, w1: Tensor, w2: Tensor, scale: Tensor,
                                   wanted: Sequence[bool]) -> list[Tensor | None]:
    """The gradients of :func:`_compose`'s convolution: ``d w2`` is its input gradient (a 1x1 convolution of
    ``G`` with ``w1``), ``d w1`` its weight gradient (with ``G`` scaled per output channel)."""
    grad_w1 = grad_w2 = grad_scale = None
    if wanted[0]:
        t, i = w1.shape[:2]
        scaled_grad = grad * _col(scale)
        grad_w1 = torch.nn.grad.conv2d_weight(w2, (i, t, 1, 1), scaled_grad).reshape(i, t).t()
        grad_w1 = grad_w1.unsqueeze(-1).unsqueeze(-1)
    if wanted[1] or wanted[2]:
        unscaled = F.conv2d(grad, w1)  # d<G, K>/d w2 without scale
        grad_w2 = _scaled(unscaled, scale, w2) if wanted[1] else None
        grad_scale = _channel_dot(unscaled, w2) if wanted[2] else None
    return [grad_w1, grad_w2, grad_scale]


def assemble_kernel(weight: Tensor, main_scale: Tensor, terms: Sequence[Term]) -> Tensor:
    """``main_scale * weight`` plus every term, as one autograd node."""
    specs = tuple(_spec(t) for t in terms)
    flat = [getattr(t, f) for t in terms for f in _FIELDS[type(t)]]
    return _Assemble.apply(specs, weight, main_scale, *flat)
