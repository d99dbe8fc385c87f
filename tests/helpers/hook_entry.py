"""Setting options on a ``DyRepHook`` config entry: DyRep's options go into its ``dyrep`` block, the hook's
own (``deploy``, ``by_epoch``, ...) onto the entry."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any


def set_hook_options(entry: MutableMapping[str, Any], **options: Any) -> MutableMapping[str, Any]:
    """Put ``options`` on the hook ``entry`` (in place), each where the hook reads it; the entry."""
    from dyrep_fx.mm.dyrep_options import DYREP_OPTIONS

    block = dict(entry.get("dyrep") or {})
    block.update({k: v for k, v in options.items() if k in DYREP_OPTIONS})
    entry.update({k: v for k, v in options.items() if k not in DYREP_OPTIONS})
    entry["dyrep"] = block
    return entry
