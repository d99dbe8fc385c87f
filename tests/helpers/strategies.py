"""Hypothesis strategies (conv configurations) and state shufflers shared by the kernel and block tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import Tensor, nn

from .numerics import randomise_bns

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class ConvCfg:
    """Everything needed to build one ``nn.Conv2d`` and an input for it."""

    cin: int
    cout: int
    kernel: int | tuple[int, int]
    stride: int | tuple[int, int]
    dilation: int | tuple[int, int]
    groups: int
    padding: int | tuple[int, int] | str
    bias: bool
    padding_mode: str
    h: int
    w: int

    def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Padding per side ``((top, bottom), (left, right))``, resolved independently of the library."""
        k, d = _pair(self.kernel), _pair(self.dilation)
        if self.padding == "valid":
            return ((0, 0), (0, 0))
        if self.padding == "same":
            tot = [d[i] * (k[i] - 1) for i in range(2)]
            return tuple((t // 2, t - t // 2) for t in tot)  # type: ignore[return-value]
        p = _pair(self.padding)
        return ((p[0], p[0]), (p[1], p[1]))

    def out_size(self) -> tuple[int, int]:
        k, s, d = _pair(self.kernel), _pair(self.stride), _pair(self.dilation)
        out = []
        for i, n in enumerate((self.h, self.w)):
            span = n + sum(self.pads()[i]) - d[i] * (k[i] - 1)
            out.append(0 if span < 1 else (span - 1) // s[i] + 1)
        return out[0], out[1]

    def build(self, dtype: torch.dtype = torch.float64, cls: type[nn.Conv2d] = nn.Conv2d) -> nn.Conv2d:
        return cls(self.cin, self.cout, self.kernel, self.stride, self.padding, self.dilation, self.groups,
                   bias=self.bias, padding_mode=self.padding_mode, dtype=dtype)

    def input(self, dtype: torch.dtype = torch.float64, batch: int = 2) -> Tensor:
        return torch.randn(batch, self.cin, self.h, self.w, dtype=dtype)

    def accepted_by_torch(self) -> bool:
        """Whether torch itself runs this conv (reflect/circular padding limit the pad to the input size)."""
        if min(self.out_size()) < 1:
            return False
        try:
            with torch.no_grad():
                self.build(torch.float64)(self.input(torch.float64, batch=1))
        except (RuntimeError, ValueError):
            return False
        return True


@st.composite
def conv_cfgs(
    draw,
    padding_modes: tuple[str, ...] = ("zeros",),
    max_kernel: int = 7,
    square_io: bool | None = None,
    map_sizes: tuple[int, int] = (5, 12),
) -> ConvCfg:
    """A conv configuration torch accepts, with a non-empty output.

    Channels 1..8 (grouped: groups 1, 2, 3 or depthwise with multiplier 1 or 2), kernels 1..``max_kernel``
    (often non-square), stride 1..2 and dilation 1..3 (per axis), padding an int, a per-axis tuple,
    ``'same'`` (stride 1 only) or ``'valid'``, maps of ``map_sizes`` px (5..12).
    """
    gkind = draw(st.sampled_from(["1", "2", "3", "dw"]))
    same_io = draw(st.booleans()) if square_io is None else square_io
    if gkind == "dw":
        c = draw(st.integers(2, 6))
        groups, cin = c, c
        cout = c if same_io else c * draw(st.sampled_from([1, 2]))
    else:
        groups = int(gkind)
        cin = groups * draw(st.integers(1, 8 // groups))
        cout = cin if same_io else groups * draw(st.integers(1, 8 // groups))
    kh = draw(st.integers(1, max_kernel))
    kw = draw(st.one_of(st.just(kh), st.integers(1, max_kernel)))
    kernel = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    stride = sh if sh == sw else (sh, sw)
    dh = draw(st.integers(1, 3))
    dw = draw(st.one_of(st.just(dh), st.integers(1, 3)))
    dilation = dh if dh == dw else (dh, dw)
    pkind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pkind == "same" and (sh, sw) != (1, 1):
        pkind = "tuple"
    if pkind == "int":
        padding: int | tuple[int, int] | str = draw(st.integers(0, 3))
    elif pkind == "tuple":
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    else:
        padding = pkind
    cfg = ConvCfg(
        cin=cin, cout=cout, kernel=kernel, stride=stride, dilation=dilation, groups=groups, padding=padding,
        bias=draw(st.booleans()), padding_mode=draw(st.sampled_from(padding_modes)),
        h=draw(st.integers(*map_sizes)), w=draw(st.integers(*map_sizes)),
    )
    assume(cfg.accepted_by_torch())
    return cfg


@torch.no_grad()
def perturb(module: nn.Module, amount: float = 0.1) -> None:
    """Move every parameter by ``amount * N(0, 1)``, as a training step would."""
    for p in module.parameters():
        p.add_(amount * torch.randn_like(p))


def shuffle_state(module: nn.Module) -> None:
    """Randomise BatchNorm statistics and perturb all parameters."""
    randomise_bns(module, seed=None, signed=True)
    perturb(module)
