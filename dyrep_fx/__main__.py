"""``python -m dyrep_fx``: the same as the ``dyrep-fx`` command."""

from .cli import main

raise SystemExit(main())
