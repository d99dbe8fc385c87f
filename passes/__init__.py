"""Graph passes of dyrep_fx, imported as ``dyrep_fx.passes``.

One contract for all: ``run(traced, model, **options) -> PassReport``, where ``traced`` is the
:class:`~dyrep_fx.tracing.TracedModel` torch.fx produced for ``model``. Passes that rewrite plan and
validate everything first and mutate after, undoing their own changes if a mutation fails.

* :mod:`.analysis` -- every conv site, its geometry, and whether it can be re-parameterized;
* :mod:`.rep` -- grow branches at chosen sites (DyRep's Rep step);
* :mod:`.dep` -- cut branches, by name or by DyRep's importance criterion (the Dep step);
* :mod:`.fold` -- every block back to a plain conv of the original architecture;
* :mod:`.fuse_bn` -- conv + BatchNorm to one conv with bias, for inference deployment.
"""

from . import analysis, dep, fold, fuse_bn, rep
from .base import PassError, PassReport

__all__ = ["PassReport", "PassError", "analysis", "rep", "dep", "fold", "fuse_bn"]
