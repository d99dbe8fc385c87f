"""The online kernel assembly Function: same kernel as the op-by-op sum, exact gradients (gradcheck)."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.profiles import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from dyrep_fx import kernels
from dyrep_fx.assembly import assemble_kernel
from dyrep_fx.kinds.composed import ComposedTerm
from dyrep_fx.kinds.filtered import FilterTerm
from dyrep_fx.kinds.window_term import WindowTerm


def rand(*shape: int, grad: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=grad)


def build_terms(out_c: int, in_c: int, groups: int, k: tuple[int, int], device: torch.device | str = "cpu"):
    """One term of every shape: 1x1, 1xk, kx1 windows, a constant window, two filters (summed in one
    product) and a composed term."""
    kh, kw = k
    ig, cm = in_c // groups, in_c
    r = functools.partial(rand, device=device)
    terms = [
        WindowTerm(r(out_c, ig, 1, 1), r(out_c), (kh // 2, kw // 2)),
        WindowTerm(r(out_c, ig, 1, kw), r(out_c), (kh // 2, 0)),
        WindowTerm(r(out_c, ig, kh, 1), r(out_c), (0, kw // 2)),
        WindowTerm(r(out_c, ig, 1, 1, grad=False), r(out_c), (0, kw - 1)),
        FilterTerm(r(out_c, ig, 1, 1), r(out_c), torch.rand(out_c, kh, kw, dtype=torch.float64, device=device)),
        FilterTerm(r(out_c, ig, 1, 1), r(out_c), torch.randn(out_c, kh, kw, dtype=torch.float64, device=device)),
        ComposedTerm(r(cm, ig, 1, 1), r(out_c, cm // groups, kh, kw), r(out_c), groups),
    ]
    return r(out_c, ig, kh, kw), r(out_c), terms


def reference(weight, main_scale, terms):
    """The plain autograd sum, from the pure kernel algebra."""
    kernel = main_scale.reshape(-1, 1, 1, 1) * weight
    size = weight.shape[-2:]
    for t in terms:
        if isinstance(t, WindowTerm):
            part = kernels.embed_kernel(t.small, size, t.offset)
        elif isinstance(t, FilterTerm):
            part = kernels.merge_1x1_depthwise(t.w1, None, t.spatial)[0]
        else:
            part = kernels.merge_1x1_kxk(t.w1, None, t.w2, None, t.groups)[0]
        kernel = kernel + t.scale.reshape(-1, 1, 1, 1) * part
    return kernel


def leaves(weight, main_scale, terms):
    tensors = [weight, main_scale]
    for t in terms:
        tensors += [v for v in vars(t).values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return tensors


@settings(max_examples=examples(20), deadline=None)
@given(groups=st.sampled_from([1, 2]), mult=st.integers(1, 2), k=st.sampled_from([(3, 3), (1, 3), (5, 3), (2, 2)]),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_and_gradients_equal_the_autograd_sum(groups, mult, k, seed, device):
    torch.manual_seed(seed)
    weight, main_scale, terms = build_terms(2 * mult, 2 * groups, groups, k, device)
    out = assemble_kernel(weight, main_scale, terms)
    ref = reference(weight, main_scale, terms)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = leaves(weight, main_scale, terms)
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck(groups, device):
    torch.manual_seed(groups)
    weight, main_scale, terms = build_terms(4, 4, groups, (3, 3), device)
    params = leaves(weight, main_scale, terms)

    def fn(*tensors):
        it = iter(tensors[2:])
        rebuilt = []
        for t in terms:
            values = {name: (next(it) if isinstance(v, torch.Tensor) and v.requires_grad else v)
                      for name, v in vars(t).items()}
            rebuilt.append(type(t)(**values))
        return assemble_kernel(tensors[0], tensors[1], rebuilt)

    assert torch.autograd.gradcheck(fn, params)


def test_a_channels_last_kernel_adds_its_filter_terms_one_by_one():
    torch.manual_seed(0)
    weight, main_scale, terms = build_terms(4, 4, 1, (3, 3))
    weight = weight.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.testing.assert_close(assemble_kernel(weight, main_scale, terms), reference(weight, main_scale, terms),
                               rtol=1e-12, atol=1e-12)


def test_no_terms_is_the_scaled_kernel():
    weight, scale = rand(3, 2, 3, 3), rand(3)
    torch.testing.assert_close(assemble_kernel(weight, scale, []), scale.reshape(-1, 1, 1, 1) * weight)
