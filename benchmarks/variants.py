"""The model variants the benchmarks compare, built the same way in every script.

* ``plain``: the torchvision model as is.
* ``dyrep_online`` / ``dyrep_dbb``: a paper-sized final DyRep structure -- ``sites`` 3x3 convs grown with
  DyRep's branch set, and the inner kxk of the first ``nested`` of them grown again (20 sites in all by
  default) -- in online (OREPA-style) or dbb (BatchNorm per branch) mode.
* ``dbb_all``: every 3x3 conv with DBB's branches in dbb mode (the static baseline DyRep compares to).
* ``orepa_all``: every 3x3 conv with OREPA's linear branches in online mode.
* ``dbb_all_recompute`` / ``dyrep_dbb_recompute``: the dbb-mode variants transformed with ``recompute=True``
  (1x1 stages run again in backward instead of keeping their outputs).
* ``ref_dbb`` / ``ref_orepa``: the reference implementations, for side-by-side runs: every 3x3 conv of a
  torchvision ResNet and the BatchNorm after it replaced by the published block (DBB's
  ``DiverseBranchBlock``, OREPA's ``OREPA``; each carries its own BatchNorms). Their code is not part of
  this project: set ``DYREP_FX_REFERENCE_DBB`` / ``DYREP_FX_REFERENCE_OREPA`` to a checkout of
  github.com/DingXiaoH/DiverseBranchBlock / github.com/JUGGHM/OREPA_CVPR2022 (torch and numpy are all
  they need). OREPA's block carries six branches where ``orepa_all`` grows four.
* ``ref_dbb_bn``: ``ref_dbb`` keeping the model's BatchNorm after each block, the structure ``dbb_all``
  has (dyrep_fx keeps the user's layers; DBB's published ResNet drops that BatchNorm).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
import torchvision
from torch import nn

import dyrep_fx
from dyrep_fx import DBB_KINDS, OREPA_KINDS
from dyrep_fx.controller import DYREP_KINDS

VARIANTS = ("plain", "dyrep_online", "dyrep_dbb", "dbb_all", "orepa_all")
#: Opt-in variants: a dbb-mode variant with every block's ``recompute`` set.
RECOMPUTE_VARIANTS = ("dbb_all_recompute", "dyrep_dbb_recompute")
#: ``variant: (environment variable naming the checkout, module, block class)``.
REFERENCES = {"ref_dbb": ("DYREP_FX_REFERENCE_DBB", "diversebranchblock", "DiverseBranchBlock"),
              "ref_dbb_bn": ("DYREP_FX_REFERENCE_DBB", "diversebranchblock", "DiverseBranchBlock"),
              "ref_orepa": ("DYREP_FX_REFERENCE_OREPA", "blocks", "OREPA")}
# Module names the two checkouts share or use generically: dropped between loads so each gets its own.
_REFERENCE_MODULES = ("dbb_transforms", "basic", "blocks", "diversebranchblock", "convnet_utils")


def available_references() -> list[str]:
    """The reference variants whose checkout is configured."""
    return [v for v, (env, _, _) in REFERENCES.items() if os.environ.get(env)]


def _reference_block(variant: str) -> type[nn.Module]:
    env, module, cls = REFERENCES[variant]
    folder = os.environ.get(env)
    if not folder:
        raise RuntimeError(f"variant {variant!r} runs the reference implementation: set {env} to a checkout of it")
    for name in _REFERENCE_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, folder)
    try:
        return getattr(importlib.import_module(module), cls)
    finally:
        sys.path.remove(folder)


def _with_reference_blocks(model: nn.Module, block: type[nn.Module], keep_bn: bool) -> nn.Module:
    """Every 3x3 ``convN`` and (unless ``keep_bn``) the ``bnN`` after it (torchvision's ResNet blocks) replaced
    by ``block``."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            bn_name = name.replace("conv", "bn")
            if (name.startswith("conv") and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
                    and isinstance(getattr(parent, bn_name, None), nn.BatchNorm2d)):
                setattr(parent, name, block(conv.in_channels, conv.out_channels, 3, stride=conv.stride[0],
                                            padding=1, groups=conv.groups))
                if not keep_bn:
                    setattr(parent, bn_name, nn.Identity())
    return model


def _three_by_three(model: nn.Module) -> list[str]:
    return [s.name for s in dyrep_fx.sites(model) if s.eligible and s.kernel_size == (3, 3) and s.depth == 0]


def build(model_name: str, variant: str, sites: int = 16, nested: int = 4, seed: int = 0) -> nn.Module:
    """A torchvision model turned into ``variant`` (random weights, training mode)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(model_name, weights=None)
    if variant == "plain":
        return model
    if variant in REFERENCES:
        return _with_reference_blocks(model, _reference_block(variant), keep_bn=variant.endswith("_bn"))
    recompute = variant in RECOMPUTE_VARIANTS
    variant = variant.removesuffix("_recompute")
    mode = "dbb" if variant in ("dyrep_dbb", "dbb_all") else "online"
    dyrep_fx.transform(model, mode=mode, recompute=recompute)
    convs = _three_by_three(model)
    if variant in ("dyrep_online", "dyrep_dbb"):
        chosen = convs[:sites]
        for name in chosen:
            kinds = [k for k in DYREP_KINDS if k in next(s.kinds for s in dyrep_fx.sites(model) if s.name == name)]
            dyrep_fx.grow(model, [name], kinds)
        inner = [f"{n}.{rel}" for n in chosen[:nested] for rel in model.get_submodule(n).inner_convs()]
        for name in inner:
            kinds = [k for k in DYREP_KINDS if k in next(s.kinds for s in dyrep_fx.sites(model) if s.name == name)]
            dyrep_fx.grow(model, [name], kinds)
    elif variant == "dbb_all":
        dyrep_fx.grow(model, convs, list(DBB_KINDS))
    elif variant == "orepa_all":
        dyrep_fx.grow(model, convs, list(OREPA_KINDS))
    else:
        raise ValueError(f"unknown variant {variant!r}; variants: {VARIANTS + RECOMPUTE_VARIANTS + tuple(REFERENCES)}")
    return model
