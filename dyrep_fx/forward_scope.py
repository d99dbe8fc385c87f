"""The span an online block's assembled kernel may be reused in: one forward call of a transformed model.

A conv called several times in one forward pass (a detection head conv shared by the pyramid levels)
should assemble its online kernel once, so that one autograd node receives the summed gradient of all
calls. Reusing it any longer is unsafe: a write between two forward calls of the model (``p.data``,
``set_``, a copy under ``torch.no_grad()``, ``load_state_dict``, an EMA update) need not change any
version counter, and a kernel kept across it computes with the old values.

So a kept kernel lives in a :class:`ForwardScope`, opened by a forward pre-hook on every transformed
module and closed by its forward hook (also when the forward raises). A block called outside any scope
(on its own, or from code that bypasses the transformed module's ``forward``) assembles its kernel at
every call: always correct, only without the saving. Scopes are per thread (``nn.DataParallel``
replicas) and nest: a transformed module called inside another's forward shares the outer scope.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ForwardScope", "active_scope", "install", "uninstall"]


class ForwardScope:
    """The kernels assembled during one forward call, by block, each under the key it was assembled for."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[Any, Tensor]] = {}

    def get(self, owner: nn.Module, key: Any) -> Tensor | None:
        """The kernel ``owner`` assembled in this scope under ``key``, or None."""
        kept = self._kept.get(id(owner))
        return kept[1] if kept is not None and kept[0] == key else None

    def keep(self, owner: nn.Module, key: Any, kernel: Tensor) -> None:
        """Keep ``kernel`` for the rest of this scope (the scope holds ``owner`` alive only by id: blocks
        outlive the forward call of the model that holds them)."""
        self._kept[id(owner)] = (key, kernel)


class _Scopes(threading.local):
    def __init__(self) -> None:
        self.current: ForwardScope | None = None
        self.depth = 0


_SCOPES = _Scopes()


def active_scope() -> ForwardScope | None:
    """The scope of the forward call running in this thread, or None outside every transformed forward."""
    return _SCOPES.current


def _open(module: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():  # a compiled graph shares the kernel by itself; keep hooks out of it
        return
    if _SCOPES.depth == 0:
        _SCOPES.current = ForwardScope()
    _SCOPES.depth += 1


def _close(module: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling() or _SCOPES.depth == 0:
        return
    _SCOPES.depth -= 1
    if _SCOPES.depth == 0:
        _SCOPES.current = None  # every kept kernel goes (the autograd graph keeps what backward needs)


def install(module: nn.Module) -> None:
    """Open a scope for every forward call of ``module`` (idempotent; copies of ``module`` inherit it)."""
    if _open not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_open)
        module.register_forward_hook(_close, always_call=True)


def uninstall(module: nn.Module) -> None:
    """Remove what :func:`install` added (a folded model no longer needs it)."""
    for hooks, fn in ((module._forward_pre_hooks, _open), (module._forward_hooks, _close)):
        for key in [k for k, v in hooks.items() if v is fn]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)
