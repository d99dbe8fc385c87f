"""Each function of :mod:`dyrep_fx.kernels` against the real convolution composition it replaces (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers.numerics import rel_err
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dyrep_fx.kernels import (
    AlignmentError,
    add_branches,
    embed_kernel,
    embed_offset,
    frequency_prior,
    fuse_bn,
    identity_kernel,
    identity_offset,
    merge_1x1_depthwise,
    merge_1x1_kxk,
)

D = torch.float64
TOL = 1e-12
FAST = settings(max_examples=examples(60), deadline=None)


def _pad(x, pads):
    """Zero-pad ``x`` by ``((top, bottom), (left, right))``."""
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom))


def _unchanged(*tensors):
    """Snapshot tensors; calling the result asserts none of them was mutated."""
    copies = [None if t is None else t.clone() for t in tensors]

    def check():
        for t, c in zip(tensors, copies):
            if t is not None:
                assert torch.equal(t, c), "a kernels function mutated its input"

    return check


@st.composite
def grouped_channels(draw, max_per_group: int = 4):
    """``(groups, c_in, c_out)`` with groups 1, 2 or depthwise (c_in == groups)."""
    kind = draw(st.sampled_from(["1", "2", "dw"]))
    if kind == "dw":
        g = draw(st.integers(2, 6))
        return g, g, g * draw(st.integers(1, 2))
    g = int(kind)
    return g, g * draw(st.integers(1, max_per_group)), g * draw(st.integers(1, max_per_group))


# ---------------------------------------------------------------------------------------------- fuse_bn
@FAST
@given(ch=grouped_channels(), k=st.integers(1, 5), bias=st.booleans(), affine=st.booleans(),
       stride=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_fuse_bn_matches_conv_then_eval_bn(ch, k, bias, affine, stride, seed, device):
    torch.manual_seed(seed)
    g, cin, cout = ch
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=g, bias=bias, dtype=D, device=device)
    bn = nn.BatchNorm2d(cout, eps=1e-3, affine=affine, dtype=D, device=device).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(2, cin, 9, 8, dtype=D, device=device)
    check = _unchanged(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    w, b = fuse_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    check()
    assert w.shape == conv.weight.shape and b.shape == (cout,)
    ref = bn(conv(x))
    out = F.conv2d(x, w, b, stride, k // 2, 1, g)
    assert rel_err(out, ref) < TOL


def test_fuse_bn_formula():
    w = torch.randn(3, 2, 3, 3, dtype=D)
    mean, var = torch.tensor([0.5, -1.0, 2.0], dtype=D), torch.tensor([4.0, 0.25, 1.0], dtype=D)
    gamma, beta = torch.tensor([2.0, -1.0, 0.5], dtype=D), torch.tensor([1.0, 0.0, -3.0], dtype=D)
    fw, fb = fuse_bn(w, None, mean, var, gamma, beta, 0.0)
    scale = gamma / var.sqrt()
    assert torch.allclose(fw, w * scale.view(-1, 1, 1, 1), rtol=0, atol=1e-15)
    assert torch.allclose(fb, beta - mean * scale, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------- embed_kernel
@FAST
@given(
    small=st.tuples(st.integers(1, 5), st.integers(1, 5)), extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    data=st.data(), stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dil=st.tuples(st.integers(1, 3), st.integers(1, 3)), seed=st.integers(0, 2**31 - 1),
)
def test_embed_kernel_reads_the_same_window(small, extra, data, stride, dil, seed):
    """A big conv with the embedded kernel equals the small conv on the sub-window it sits in."""
    torch.manual_seed(seed)
    a, b = small
    kh, kw = a + extra[0], b + extra[1]
    th, tw = data.draw(st.integers(0, extra[0])), data.draw(st.integers(0, extra[1]))
    k = torch.randn(4, 3, a, b, dtype=D)
    check = _unchanged(k)
    e = embed_kernel(k, (kh, kw), (th, tw))
    check()
    assert e.shape == (4, 3, kh, kw)
    assert torch.equal(e[:, :, th:th + a, tw:tw + b], k)
    mask = torch.ones(kh, kw, dtype=torch.bool)
    mask[th:th + a, tw:tw + b] = False
    assert (e[:, :, mask] == 0).all()
    x = torch.randn(2, 3, dil[0] * (kh - 1) + 6, dil[1] * (kw - 1) + 5, dtype=D)
    big = F.conv2d(x, e, None, stride, 0, dil)
    top, left = th * dil[0], tw * dil[1]
    bottom, right = (kh - a - th) * dil[0], (kw - b - tw) * dil[1]
    window = x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]
    assert rel_err(big, F.conv2d(window, k, None, stride, 0, dil)) < TOL


@pytest.mark.parametrize("size,offset", [((3, 3), (-1, 0)), ((3, 3), (0, 3)), ((3, 3), (2, 0)), ((2, 5), (0, 3))])
def test_embed_kernel_refuses_what_does_not_fit(size, offset):
    with pytest.raises(AlignmentError, match="does not fit"):
        embed_kernel(torch.randn(1, 1, 2, 3), size, offset)


def test_embed_offset_centres():
    assert embed_offset(3, 1) == 1 and embed_offset(5, 3) == 1 and embed_offset(7, 1) == 3
    assert embed_offset(4, 1) == 1 and embed_offset(4, 3) == 0 and embed_offset(3, 3) == 0


# ------------------------------------------------------------------------------------ merge_1x1_kxk
@FAST
@given(
    ch=grouped_channels(), mid_mult=st.integers(1, 2), k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), stride=st.integers(1, 2), dil=st.integers(1, 2),
    b1=st.booleans(), b2=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_merge_1x1_kxk_equals_the_sequence_on_the_padded_input(ch, mid_mult, k, pad, stride, dil, b1, b2, seed,
                                                              device):
    """1x1 (bias b1) on the zero-padded input, then a valid kxk (bias b2) == one conv on the padded input."""
    torch.manual_seed(seed)
    g, cin, cout = ch
    mid = cin * mid_mult if g != cin else cin  # depthwise keeps T == C == g
    w1 = torch.randn(mid, cin // g, 1, 1, dtype=D, device=device)
    w2 = torch.randn(cout, mid // g, *k, dtype=D, device=device)
    bias1 = torch.randn(mid, dtype=D, device=device) if b1 else None
    bias2 = torch.randn(cout, dtype=D, device=device) if b2 else None
    x = torch.randn(2, cin, 9, 10, dtype=D, device=device)
    xp = _pad(x, ((pad[0], pad[0]), (pad[1], pad[1])))
    check = _unchanged(w1, bias1, w2, bias2)
    w, b = merge_1x1_kxk(w1, bias1, w2, bias2, g)
    check()
    assert w.shape == (cout, cin // g, *k)
    assert (b is None) == (bias1 is None and bias2 is None)
    ref = F.conv2d(F.conv2d(xp, w1, bias1, 1, 0, 1, g), w2, bias2, stride, 0, dil, g)
    out = F.conv2d(xp, w, b, stride, 0, dil, g)
    assert rel_err(out, ref) < TOL


def test_merge_1x1_kxk_needs_the_bias_padded_intermediate():
    """With a 1x1 bias and a zero-padded *intermediate* map the border differs: the documented condition."""
    torch.manual_seed(1)
    w1, b1 = torch.randn(4, 3, 1, 1, dtype=D), torch.randn(4, dtype=D)
    w2 = torch.randn(5, 4, 3, 3, dtype=D)
    x = torch.randn(1, 3, 7, 7, dtype=D)
    w, b = merge_1x1_kxk(w1, b1, w2, None)
    naive = F.conv2d(F.conv2d(x, w1, b1), w2, None, 1, 1)
    merged = F.conv2d(x, w, b, 1, 1)
    assert rel_err(merged[..., 1:-1, 1:-1], naive[..., 1:-1, 1:-1]) < TOL  # interior agrees
    assert rel_err(merged, naive) > 1e-3  # border does not


# ---------------------------------------------------------------------------- merge_1x1_depthwise
@FAST
@given(
    ch=grouped_channels(), k=st.tuples(st.integers(1, 4), st.integers(1, 4)), pad=st.integers(0, 2),
    stride=st.integers(1, 2), b1=st.booleans(), b2=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_merge_1x1_depthwise_equals_1x1_then_per_channel_filter(ch, k, pad, stride, b1, b2, seed):
    torch.manual_seed(seed)
    g, cin, cout = ch
    w1 = torch.randn(cout, cin // g, 1, 1, dtype=D)
    spatial = torch.randn(cout, *k, dtype=D)
    bias1 = torch.randn(cout, dtype=D) if b1 else None
    bias2 = torch.randn(cout, dtype=D) if b2 else None
    xp = _pad(torch.randn(2, cin, 8, 9, dtype=D), ((pad, pad), (pad, pad)))
    check = _unchanged(w1, bias1, spatial, bias2)
    w, b = merge_1x1_depthwise(w1, bias1, spatial, bias2)
    check()
    assert w.shape == (cout, cin // g, *k)
    z = F.conv2d(xp, w1, bias1, 1, 0, 1, g)
    ref = F.conv2d(z, spatial.unsqueeze(1), bias2, stride, 0, 1, cout)
    assert rel_err(F.conv2d(xp, w, b, stride, 0, 1, g), ref) < TOL


# --------------------------------------------------------------------------- identity_offset/kernel
def _onehot_is_identity(size, dilation, pads, t, n=24):
    x = torch.randn(1, 1, 1, n, dtype=D)
    k = torch.zeros(1, 1, 1, size, dtype=D)
    k[..., t] = 1
    y = F.conv2d(F.pad(x, pads), k, None, 1, 0, (1, dilation))
    return y.shape == x.shape and torch.equal(y, x)


@settings(max_examples=examples(200), deadline=None)
@given(size=st.integers(1, 6), dilation=st.integers(1, 3), before=st.integers(0, 8), after=st.integers(0, 8))
def test_identity_offset_brute_force(size, dilation, before, after):
    t = identity_offset(size, dilation, before, after)
    found = [u for u in range(size) if _onehot_is_identity(size, dilation, (before, after), u)]
    if t is None:
        assert found == []
    else:
        assert found == [t]


@pytest.mark.parametrize(
    "k,d,expected",
    [(3, 1, 1), (4, 1, 1), (2, 1, 0), (5, 2, 2), (1, 3, 0), (6, 1, 2),
     # an even kernel with a dilation > 1: the padding before is not a multiple of d, no identity tap
     (4, 3, None), (2, 3, None), (2, 2, None), (4, 2, None)],
)
def test_identity_offset_same_padding(k, d, expected):
    """torch's 'same' padding (the odd pixel goes after), including the asymmetric cases."""
    total = d * (k - 1)
    before, after = total // 2, total - total // 2
    assert identity_offset(k, d, before, after) == expected
    found = [t for t in range(k) if _onehot_is_identity(k, d, (before, after), t)]
    assert found == ([] if expected is None else [expected])


@FAST
@given(
    c_g=st.sampled_from([(4, 1), (4, 2), (4, 4), (6, 3), (3, 1)]),
    k=st.tuples(st.integers(1, 5), st.integers(1, 5)), d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    same=st.booleans(), data=st.data(),
)
def test_identity_kernel_returns_the_input(c_g, k, d, same, data):
    c, g = c_g
    pads = []
    for i in range(2):
        if same:
            total = d[i] * (k[i] - 1)
            pads.append((total // 2, total - total // 2))
        else:
            t = data.draw(st.integers(0, k[i] - 1))
            pads.append((t * d[i], (k[i] - 1 - t) * d[i]))
    offs = tuple(identity_offset(k[i], d[i], *pads[i]) for i in range(2))
    for i in range(2):
        if offs[i] is None:  # only 'same' with an even kernel and a dilation > 1 has no identity tap
            assert same and k[i] % 2 == 0 and d[i] > 1
            assert not any(_onehot_is_identity(k[i], d[i], pads[i], t) for t in range(k[i]))
    if None in offs:
        return
    w = identity_kernel(c, g, k, offs, dtype=D)
    assert w.shape == (c, c // g, *k)
    x = torch.randn(2, c, 7, 6, dtype=D)
    assert torch.equal(F.conv2d(_pad(x, pads), w, None, 1, 0, d, g), x)


@pytest.mark.parametrize(
    "size,d,before,after",
    [(3, 1, 0, 0), (3, 1, 3, 0), (3, 2, 1, 1), (2, 1, 1, 1), (1, 1, 1, 1), (3, 1, 1, 2), (4, 2, 3, 3)],
)
def test_identity_offset_none_where_impossible(size, d, before, after):
    assert identity_offset(size, d, before, after) is None
    assert not any(_onehot_is_identity(size, d, (before, after), t) for t in range(size))


# ------------------------------------------------------------------------------------- add_branches
@FAST
@given(n=st.integers(1, 5), g=st.sampled_from([1, 2]), stride=st.integers(1, 2),
       biases=st.lists(st.booleans(), min_size=5, max_size=5), seed=st.integers(0, 2**31 - 1))
def test_add_branches_equals_summed_outputs(n, g, stride, biases, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, dtype=D)
    ks = [torch.randn(6, 4 // g, 3, 3, dtype=D) for _ in range(n)]
    bs = [torch.randn(6, dtype=D) if biases[i] else None for i in range(n)]
    check = _unchanged(*ks, *bs)
    w, b = add_branches(ks, bs)
    check()
    assert (b is None) == all(v is None for v in bs)
    ref = sum(F.conv2d(x, ki, bi, stride, 1, 1, g) for ki, bi in zip(ks, bs))
    assert rel_err(F.conv2d(x, w, b, stride, 1, 1, g), ref) < TOL


# ---------------------------------------------------------------------------------- frequency_prior
@pytest.mark.parametrize("size", [(3, 3), (1, 3), (3, 1), (2, 2), (5, 4), (7, 7)])
@pytest.mark.parametrize("channels", [1, 5, 20])
def test_frequency_prior_shape_and_zero_mean(size, channels):
    p = frequency_prior(channels, size, dtype=D)
    assert p.shape == (channels, *size) and p.dtype == D
    # Orthogonal to the constant pattern (the avg branch): every pattern sums to ~0.
    assert p.sum((1, 2)).abs().max() < 1e-12
    assert (p.abs().amax((1, 2)) > 0.1).all()  # no pattern is (near) zero
    n = size[0] * size[1] - 1  # non-constant frequencies
    flat = p.reshape(channels, -1)
    m = min(channels, n)
    gram = flat[:m] @ flat[:m].T
    assert torch.allclose(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-12)
    for c in range(n, channels):  # channels cycle through the frequencies
        assert torch.allclose(flat[c], flat[c % n])


def test_frequency_prior_formula():
    p = frequency_prior(3, (3, 4), dtype=D)
    u, v = 2, 3
    # channel 0 is (fh, fw) = (0, 1); channel 2 is (0, 3)
    assert p[0, u, v].item() == pytest.approx(math.cos(math.pi * (v + 0.5) * 1 / 4))
    assert p[2, u, v].item() == pytest.approx(math.cos(math.pi * (v + 0.5) * 3 / 4))


def test_frequency_prior_refuses_1x1():
    with pytest.raises(ValueError, match="1x1"):
        frequency_prior(4, (1, 1))
