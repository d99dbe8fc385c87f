"""The model variants the benchmarks compare, built the same way in every script.

* ``plain``: the torchvision model as is.
* ``dyrep_online`` / ``dyrep_dbb``: a paper-sized final DyRep structure -- ``sites`` 3x3 convs grown with
  DyRep's branch set, and the inner kxk of the first ``nested`` of them grown again (20 sites in all by
  default) -- in online (OREPA-style) or dbb (BatchNorm per branch) mode.
* ``dbb_all``: every 3x3 conv with DBB's branches in dbb mode (the static baseline DyRep compares to).
* ``orepa_all``: every 3x3 conv with OREPA's linear branches in online mode.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import dyrep_fx
from dyrep_fx import DBB_KINDS, OREPA_KINDS
from dyrep_fx.controller import DYREP_KINDS

VARIANTS = ("plain", "dyrep_online", "dyrep_dbb", "dbb_all", "orepa_all")


def _three_by_three(model: nn.Module) -> list[str]:
    return [s.name for s in dyrep_fx.sites(model) if s.eligible and s.kernel_size == (3, 3) and s.depth == 0]


def build(model_name: str, variant: str, sites: int = 16, nested: int = 4, seed: int = 0) -> nn.Module:
    """A torchvision model turned into ``variant`` (random weights, training mode)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(model_name, weights=None)
    if variant == "plain":
        return model
    mode = "dbb" if variant in ("dyrep_dbb", "dbb_all") else "online"
    dyrep_fx.transform(model, mode=mode)
    convs = _three_by_three(model)
    if variant in ("dyrep_online", "dyrep_dbb"):
        chosen = convs[:sites]
        for name in chosen:
            kinds = [k for k in DYREP_KINDS if k in next(s.kinds for s in dyrep_fx.sites(model) if s.name == name)]
            dyrep_fx.grow(model, [name], kinds)
        inner = [f"{n}.branches.1x1_kxk.conv2" for n in chosen[:nested]]
        for name in inner:
            kinds = [k for k in DYREP_KINDS if k in next(s.kinds for s in dyrep_fx.sites(model) if s.name == name)]
            dyrep_fx.grow(model, [name], kinds)
    elif variant == "dbb_all":
        dyrep_fx.grow(model, convs, list(DBB_KINDS))
    elif variant == "orepa_all":
        dyrep_fx.grow(model, convs, list(OREPA_KINDS))
    else:
        raise ValueError(f"unknown variant {variant!r}; variants: {VARIANTS}")
    return model
