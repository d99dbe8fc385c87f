"""The library's own branch kinds: importing this module registers them (the registry does, on first use).

One entry per module that registers kinds; their canonical order is each kind's ``order``, not this list's.
"""

from __future__ import annotations

import importlib

#: The modules that register the library's kinds.
BUILTIN_MODULES = (
    "dyrep_fx.branches",  # DBB's, ACNet's, RepVGG's and OREPA's seven kinds
    "dyrep_fx.kinds.small_kernel",  # RepLKNet: a small kernel in a large one
    "dyrep_fx.kinds.dilated",  # UniRepLKNet: dilated small kernels
    "dyrep_fx.kinds.parallel",  # MobileOne: parallel copies of the kernel
)

for _module in BUILTIN_MODULES:
    importlib.import_module(_module)
