"""Per-call execution choice of an online block: fold a costly branch into the one kernel, or run it.

An online block computes ``conv(x, W)`` with ``W`` assembled from its branches every step. For most
branches the assembly is a few kernel-sized operations. The ``1x1_kxk`` branch is different: merging
its two kernels costs ``C_out * C_mid * C_in * kh * kw / groups**2`` multiply-adds per step, whatever the
batch, while running it as two convolutions costs in proportion to the feature map. On small maps
(late stages, small inputs) the convolutions are cheaper, on large maps the merge is. Both are the same
linear function of the same parameters; the choice is made from the shapes at each call.

(The rewrite decisions of the passes are their ``plan`` functions; this module is only about how an
online block runs.)
"""

from __future__ import annotations

from .geometry import ConvGeometry

__all__ = ["EXECUTIONS", "CONV_MAC_COST", "composed_costs", "run_composed_as_convs"]

#: ``auto``: cheaper of the two by the counts below; ``assemble``: always merge; ``convs``: always run.
EXECUTIONS = ("auto", "assemble", "convs")
#: A multiply-add of the two convolutions over one of the merge, forward and backward together. Measured
#: on CPU (2 threads, one grown ResNet block, fwd + bwd) with the merge run as a convolution
#: (:mod:`dyrep_fx.assembly`): the ways cost the same time where the convolutions count 1.1-1.4x the merge's
#: multiply-adds (128 ch at 2x2, b32: convs 1.08x the time at 1.11x the MACs; 256 ch at 3x3, b32: 0.75x at
#: 1.25x; 512 -> 256 at 14x14, b8: 1.21x at 1.45x; 512 ch at 7x7, b8: 0.85x at 0.85x).
CONV_MAC_COST = 0.8


def composed_costs(geom: ConvGeometry, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Multiply-adds per forward of a ``1x1_kxk`` branch: ``(merged into the kernel, run as two convs)``.

    ``input_shape`` is the block input's ``(N, C, H, W)``. The 1x1 runs on the unpadded input and the
    padding moves to the kxk (see :class:`~dyrep_fx.branches.ComposedBranch`), which on maps smaller than
    its window runs only the taps that read them (:meth:`~dyrep_fx.geometry.ConvGeometry.taps_run`);
    backward costs about twice forward in both ways.
    """
    n, _, h, w = input_shape
    (kh, kw), g = geom.kernel_size, geom.groups
    th, tw = geom.taps_run((h, w))
    c_in, c_mid, c_out = geom.in_channels, geom.in_channels, geom.out_channels
    ho, wo = geom.output_size((h, w))
    merged = c_out * (c_mid // g) * (c_in // g) * kh * kw
    convs = n * h * w * c_mid * (c_in // g) + n * ho * wo * c_out * (c_mid // g) * th * tw
    return merged, convs


def run_composed_as_convs(geom: ConvGeometry, input_shape: tuple[int, ...], execution: str = "auto") -> bool:
    """Whether an online ``1x1_kxk`` branch should run as convolutions on this input (else merge it)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if execution != "auto":
        return execution == "convs"
    merged, convs = composed_costs(geom, input_shape)
    return CONV_MAC_COST * convs < merged
