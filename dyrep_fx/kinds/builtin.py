"""The library's own branch kinds: importing this module registers them (the registry does, on first use).

One line per module that registers kinds; their canonical order is each kind's ``order``, not this list's.
"""

from __future__ import annotations

from .. import branches  # noqa: F401  (DBB's, ACNet's, RepVGG's and OREPA's seven kinds)
