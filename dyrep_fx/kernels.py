"""Kernel algebra for structural re-parameterization: pure functions, tensors in, tensors out.

Notation (as in DBB, CVPR 2021): a conv kernel is ``W`` of shape ``[C_out, C_in/g, kh, kw]`` with bias
``b`` of shape ``[C_out]``; a BatchNorm has running mean ``mu``, running variance ``var``, weight ``gamma``,
bias ``beta`` and ``eps``, and ``sigma = sqrt(var + eps)``. Every function here is exact algebra: the
convolution built from its result equals the composition it replaces, in any dtype up to rounding.
None of them touches a module or mutates its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "AlignmentError",
    "channel_norms",
    "fuse_bn",
    "embed_kernel",
    "embed_offset",
    "merge_1x1_kxk",
    "split_groups",
    "merge_1x1_depthwise",
    "identity_kernel",
    "identity_offset",
    "add_branches",
    "frequency_prior",
]


class AlignmentError(ValueError):
    """Raised when a smaller conv cannot be written as a kernel embedded in a larger conv."""


def fuse_bn(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv (DBB transform I).

    ``W'_o = W_o * gamma_o / sigma_o`` and ``b'_o = (b_o - mu_o) * gamma_o / sigma_o + beta_o``.
    ``gamma``/``beta`` may be ``None`` for a BatchNorm without affine parameters.
    """
    std = torch.sqrt(var + eps)
    scale = (gamma if gamma is not None else torch.ones_like(var)) / std
    shift = beta if beta is not None else torch.zeros_like(var)
    b = bias if bias is not None else torch.zeros_like(mean)
    fused_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    fused_b = (b - mean) * scale + shift
    return fused_w, fused_b


def embed_kernel(kernel: Tensor, size: Sequence[int], offset: Sequence[int]) -> Tensor:
    """Zero-pad ``kernel`` ``[O, I, a, b]`` into a ``size = (kh, kw)`` kernel, its tap (0, 0) at ``offset``.

    ``E[:, :, th + u, tw + v] = K[:, :, u, v]`` and zero elsewhere (DBB transform VI).
    """
    kh, kw = size
    th, tw = offset
    a, b = kernel.shape[-2:]
    if th < 0 or tw < 0 or th + a > kh or tw + b > kw:
        raise AlignmentError(f"a {a}x{b} kernel at offset {tuple(offset)} does not fit in {kh}x{kw}")
    # F.pad order is (left, right, top, bottom) over the last two dims.
    return torch.nn.functional.pad(kernel, (tw, kw - b - tw, th, kh - a - th))


def embed_offset(big: int, small: int) -> int:
    """The tap at which a ``small``-tap kernel is centred inside a ``big``-tap one (floor for even gaps)."""
    return (big - small) // 2


def split_groups(weight: Tensor, groups: int) -> Tensor:
    """``[O, I/g, ...]`` -> ``[g, O/g, I/g, ...]``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def merge_1x1_kxk(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, groups: int = 1
) -> tuple[Tensor, Tensor | None]:
    """Merge a 1x1 conv followed by a KxK conv, both with ``groups`` groups (DBB transform III).

    ``w1: [T, C/g, 1, 1]``, ``w2: [O, T/g, kh, kw]``. Within each group ``G``:
    ``W'_{o,i} = sum_{t in G} w2_{o,t} * w1_{t,i}`` and ``b'_o = sum_{t in G} b1_t * sum_{u,v} w2_{o,t,u,v} + b2_o``.
    Exact at the border only when the intermediate map is padded with ``b1`` rather than zeros
    (equivalently: the 1x1 conv runs on the already padded input), which is how blocks here run it.
    """
    g1 = split_groups(w1[:, :, 0, 0], groups)  # [g, T/g, C/g]
    g2 = split_groups(w2, groups)  # [g, O/g, T/g, kh, kw]
    merged = torch.einsum("gotuv,gti->goiuv", g2, g1).reshape(w2.shape[0], w1.shape[1], *w2.shape[2:])
    if b1 is None:
        return merged, b2
    bias = torch.einsum("gotuv,gt->go", g2, b1.reshape(groups, -1)).reshape(-1)
    return merged, bias if b2 is None else bias + b2


def merge_1x1_depthwise(
    w1: Tensor, b1: Tensor | None, spatial: Tensor, b2: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Merge a 1x1 conv ``w1: [O, C/g, 1, 1]`` followed by a fixed per-channel filter ``spatial: [O, kh, kw]``.

    ``W'_{o,i,u,v} = w1_{o,i} * spatial_{o,u,v}`` and ``b'_o = b1_o * sum_{u,v} spatial_{o,u,v} + b2_o``.
    Used for the avg-pool branch (``spatial = 1/(kh*kw)``) and the frequency-prior branch; exact at the
    border under the same padding condition as :func:`merge_1x1_kxk`.
    """
    merged = w1 * spatial.unsqueeze(1)
    if b1 is None:
        return merged, b2
    bias = b1 * spatial.sum(dim=(1, 2))
    return merged, bias if b2 is None else bias + b2


def identity_offset(size: int, dilation: int, pad_before: int, pad_after: int) -> int | None:
    """The tap at which a one-hot kernel makes a stride-1 conv the identity on one axis, or ``None``.

    Output row ``y`` reads input row ``y - p + t*d``; that is ``y`` for every ``y`` iff ``t*d == p`` and
    the output keeps the input's length, i.e. ``(size - 1 - t)*d == p_after``.
    """
    if pad_before % dilation:
        return None
    t = pad_before // dilation
    if t >= size or (size - 1 - t) * dilation != pad_after:
        return None
    return t


def identity_kernel(
    channels: int,
    groups: int,
    size: Sequence[int],
    offset: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """The kernel ``[C, C/g, kh, kw]`` of the identity map: a one at ``[o, o mod (C/g), th, tw]``.

    With stride 1 and an ``offset`` from :func:`identity_offset` the conv returns its input.
    """
    kh, kw = size
    th, tw = offset
    per_group = channels // groups
    w = torch.zeros(channels, per_group, kh, kw, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    w[idx, idx % per_group, th, tw] = 1.0
    return w


def add_branches(
    kernels: Sequence[Tensor], biases: Sequence[Tensor | None]
) -> tuple[Tensor, Tensor | None]:
    """Parallel convs with one configuration whose outputs are summed (DBB transform II).

    ``W' = sum_i W_i`` and ``b' = sum_i b_i`` (``None`` biases count as zero; ``None`` if all are).
    """
    weight = torch.stack(list(kernels)).sum(0)
    present = [b for b in biases if b is not None]
    return weight, (torch.stack(present).sum(0) if present else None)


def channel_norms(kernel: Tensor) -> Tensor:
    """The Frobenius norm of each output channel's kernel ``[O, I, kh, kw] -> [O]`` (in float64)."""
    return kernel.detach().to(torch.float64).flatten(1).norm(dim=1)


def frequency_prior(
    channels: int, size: Sequence[int], dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """OREPA's frequency-prior filters: one 2-D DCT-II basis pattern per channel, shape ``[C, kh, kw]``.

    ``P_{c,u,v} = cos(pi*(u+0.5)*fh/kh) * cos(pi*(v+0.5)*fw/kw)`` where channel ``c`` cycles through
    every non-constant frequency pair ``(fh, fw)`` of the window (the constant one is the avg branch).
    Defined for any window size; a 1x1 window has no non-constant frequency and is refused.
    """
    kh, kw = size
    freqs = [(fh, fw) for fh in range(kh) for fw in range(kw) if (fh, fw) != (0, 0)]
    if not freqs:
        raise ValueError("a 1x1 window has no non-constant frequency; the prior branch needs kh*kw > 1")
    u = torch.arange(kh, dtype=torch.float64, device=device) + 0.5
    v = torch.arange(kw, dtype=torch.float64, device=device) + 0.5
    patterns = []
    for c in range(channels):
        fh, fw = freqs[c % len(freqs)]
        patterns.append(torch.outer(torch.cos(math.pi * u * fh / kh), torch.cos(math.pi * v * fw / kw)))
    return torch.stack(patterns).to(dtype)
