"""Per-call execution choice of an online block: fold a costly branch into the one kernel, or run it apart.

An online block computes ``conv(x, W)`` with ``W`` assembled from its branches every step. For most
branches the assembly is a few kernel-sized operations. A branch whose merge into the kernel costs more
(a composed branch, a 1x1 then a kxk: :mod:`dyrep_fx.kinds.composed`) may instead run as its own
convolutions, which cost in proportion to the feature map: on small maps (late stages, small inputs) the
convolutions are cheaper, on large maps the merge is. Both are the same linear function of the same
parameters; the branch decides per call (:meth:`~dyrep_fx.kinds.branch.Branch.runs_apart`) from its costs
on the shapes at hand, by :func:`run_as_convs` and the block's ``execution`` setting.

(The rewrite decisions of the passes are their ``plan`` functions; this module is only about how an
online block runs.)
"""

from __future__ import annotations

__all__ = ["EXECUTIONS", "CONV_MAC_COST", "run_as_convs"]

#: ``auto``: cheaper of the two by the counts below; ``assemble``: always merge; ``convs``: always run.
EXECUTIONS = ("auto", "assemble", "convs")
#: A multiply-add of the two convolutions over one of the merge, forward and backward together. Measured
#: on CPU (2 threads, one grown ResNet block, fwd + bwd) with the merge run as a convolution
#: (:mod:`dyrep_fx.kinds.composed`): the ways cost the same time where the convolutions count 1.1-1.4x the
#: merge's multiply-adds (128 ch at 2x2, b32: convs 1.08x the time at 1.11x the MACs; 256 ch at 3x3, b32:
#: 0.75x at 1.25x; 512 -> 256 at 14x14, b8: 1.21x at 1.45x; 512 ch at 7x7, b8: 0.85x at 0.85x).
CONV_MAC_COST = 0.8


def run_as_convs(merged: int, convs: int, execution: str = "auto") -> bool:
    """Whether a branch should run as its convolutions (else merge into the kernel), given its multiply-adds
    per forward ``merged`` into the kernel and run as ``convs``, and the block's ``execution`` setting."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if execution != "auto":
        return execution == "convs"
    return CONV_MAC_COST * convs < merged
