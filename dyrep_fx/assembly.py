"""Online kernel assembly as one autograd Function: ``W = main_scale * weight + sum_b K_b``.

Each grown branch hands the block a :class:`Term`, its share ``K_b`` of the online kernel: a small frozen
dataclass of tensors (those autograd sees) and plain values (offsets, groups), that knows how to add itself
into the kernel and how to compute its tensors' gradients from the kernel's gradient ``G``. The terms' shapes
live with the kinds that use them (:mod:`dyrep_fx.kinds`); a kind whose kernel has a new shape writes a new
term class, and this module does not change.

Built from ordinary tensor ops, the sum costs every branch a few kernel-sized temporaries (an embedding
pad, a scaled copy, a sum) in forward, as many again in backward, and autograd keeps several of them
alive until backward. Here the forward adds each term into one kernel in place, and the backward computes
every parameter's gradient straight from ``G``: main: ``dW = G * main_scale``, ``d main_scale = <G, W>``
per output channel; each term: its own :meth:`Term.grads`. A term class may also add and differentiate all
its terms of one kernel together (:meth:`Term.add_all`, :meth:`Term.grads_all`: e.g. one batched product
for every fixed-filter term). Only the inputs are saved for backward. The result equals the op-by-op sum
to rounding (tested with ``gradcheck`` in float64).

Every gradient leaves backward with its input's strides, size-1 dimensions included. The contractions
would otherwise hand back other layouts (``einsum`` returns ``d w2`` channels-last), which costs a copy
twice: autograd's ``AccumulateGrad`` clones a gradient whose layout differs from its parameter's, and
for a 1x1 kernel, whose strides differ only in size-1 dimensions that autograd ignores, DDP copies it
into its bucket each step and warns "Grad strides do not match bucket view strides". The per-channel
scaling every such gradient goes through anyway (:func:`scaled`) writes straight into the parameter's layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Term", "assemble_kernel", "per_channel", "scaled", "channel_dot"]


def per_channel(scale: Tensor) -> Tensor:
    """A per-output-channel vector shaped to scale a kernel ``[O, I, kh, kw]``."""
    return scale.reshape(-1, 1, 1, 1)


def scaled(g: Tensor, scale: Tensor, like: Tensor) -> Tensor:
    """``g * scale[o]`` written in ``like``'s layout (the layout change costs no pass of its own)."""
    out = torch.empty_strided(like.shape, like.stride(), dtype=g.dtype, device=g.device)
    return torch.mul(g, per_channel(scale), out=out)


def channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum over i, u, v of a[o, ...] * b[o, ...]`` for each ``o``."""
    # A batched matmul of O tiny dot products dispatches one gemv per channel on CPU: far slower.
    return (a * b).flatten(1).sum(1)


@dataclasses.dataclass(frozen=True)
class Term:
    """One branch's share of the online kernel (the term protocol).

    A subclass is a frozen dataclass whose fields named in :attr:`tensors_of` are tensors (those autograd
    sees, gradients for each in that order) and whose other fields are plain, hashable values (offsets,
    groups). It implements :meth:`add_to` and :meth:`grads`; :meth:`add_all` and :meth:`grads_all` may
    handle all terms of the class in one kernel together.
    """

    #: The names of the fields holding tensors, in the order :meth:`grads` returns their gradients.
    tensors_of: ClassVar[tuple[str, ...]] = ()

    def tensors(self) -> tuple[Tensor, ...]:
        """The term's tensors, in :attr:`tensors_of` order."""
        return tuple(getattr(self, name) for name in self.tensors_of)

    def values(self) -> tuple[tuple[str, Any], ...]:
        """The term's other fields as ``(name, value)`` pairs (kept by backward beside the saved tensors)."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                     if f.name not in self.tensors_of)

    @classmethod
    def rebuild(cls, tensors: Sequence[Tensor], values: tuple[tuple[str, Any], ...]) -> Term:
        """The term of ``tensors`` and ``values`` (what :meth:`tensors` and :meth:`values` returned)."""
        return cls(**dict(zip(cls.tensors_of, tensors)), **dict(values))

    def add_to(self, kernel: Tensor) -> None:
        """Add this term into ``kernel`` in place."""
        raise NotImplementedError

    def grads(self, grad: Tensor, wanted: Sequence[bool]) -> list[Tensor | None]:
        """The gradient of each tensor (``None`` where not ``wanted``) from the kernel's gradient ``grad``."""
        raise NotImplementedError

    @classmethod
    def add_all(cls, kernel: Tensor, terms: Sequence[Term]) -> None:
        """Add every term of this class into ``kernel`` (one by one unless a class does better)."""
        for term in terms:
            term.add_to(kernel)

    @classmethod
    def grads_all(cls, grad: Tensor, terms: Sequence[Term],
                  wanted: Sequence[Sequence[bool]]) -> list[list[Tensor | None]]:
        """:meth:`grads` of every term of this class (one by one unless a class does better)."""
        return [term.grads(grad, w) for term, w in zip(terms, wanted)]


def _in_layout(g: Tensor | None, like: Tensor) -> Tensor | None:
    """``g`` with exactly ``like``'s strides (see the module docstring for why size-1 dimensions matter)."""
    if g is None or g.stride() == like.stride():
        return g
    if all(n == 1 or a == b for n, a, b in zip(g.shape, g.stride(), like.stride())):
        # Only the strides of size-1 dimensions differ; they address nothing, so relabel without a copy.
        return g.as_strided(like.shape, like.stride())
    return torch.empty_strided(like.shape, like.stride(), dtype=g.dtype, device=g.device).copy_(g)


def _rebuilt(layout: tuple, flat: Sequence[Tensor]) -> list[Term]:
    """The terms again from their layout (class, values, tensor count each) and the flat tensor list."""
    terms, pos = [], 0
    for cls, values, count in layout:
        terms.append(cls.rebuild(flat[pos:pos + count], values))
        pos += count
    return terms


def _by_class(terms: Sequence[Term]) -> dict[type, list[int]]:
    """The terms' positions grouped by class, classes in order of first appearance."""
    groups: dict[type, list[int]] = {}
    for i, term in enumerate(terms):
        groups.setdefault(type(term), []).append(i)
    return groups


class _Assemble(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: tuple, weight: Tensor, main_scale: Tensor, *flat: Tensor) -> Tensor:
        # (the layout holds no tensor: the terms' tensors are saved as tensors, so nothing leaks)
        ctx.layout = layout
        ctx.save_for_backward(weight, main_scale, *flat)
        kernel = weight * per_channel(main_scale)
        terms = _rebuilt(layout, flat)
        for cls, members in _by_class(terms).items():
            cls.add_all(kernel, [terms[i] for i in members])
        return kernel

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        weight, main_scale, *flat = ctx.saved_tensors
        needs = ctx.needs_input_grad
        terms = _rebuilt(ctx.layout, flat)
        starts = [3]
        for term in terms:
            starts.append(starts[-1] + len(term.tensors_of))
        per_term: list[list[Tensor | None]] = [[] for _ in terms]
        for cls, members in _by_class(terms).items():
            wanted = [needs[starts[i]:starts[i + 1]] for i in members]
            for i, grads in zip(members, cls.grads_all(grad, [terms[i] for i in members], wanted)):
                per_term[i] = [_in_layout(g, t) for g, t in zip(grads, terms[i].tensors())]
        return (None, scaled(grad, main_scale, weight) if needs[1] else None,
                channel_dot(grad, weight) if needs[2] else None, *(g for grads in per_term for g in grads))


def assemble_kernel(weight: Tensor, main_scale: Tensor, terms: Sequence[Term]) -> Tensor:
    """``main_scale * weight`` plus every term, as one autograd node."""
    layout = tuple((type(t), t.values(), len(t.tensors_of)) for t in terms)
    flat = [tensor for t in terms for tensor in t.tensors()]
    return _Assemble.apply(layout, weight, main_scale, *flat)
