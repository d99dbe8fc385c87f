"""The online block's execution choice: which way the 1x1_kxk branch runs, from the shapes."""

from __future__ import annotations

import pytest
from torch import nn

from dyrep_fx.geometry import ConvGeometry
from dyrep_fx.kinds.composed import composed_costs, run_composed_as_convs


def geometry(channels: int, groups: int = 1, stride: int = 1) -> ConvGeometry:
    return ConvGeometry.from_conv(nn.Conv2d(channels, channels, 3, stride, 1, groups=groups, bias=False))


def test_costs_count_multiply_adds() -> None:
    geom = geometry(8, groups=2, stride=2)
    merged, convs = composed_costs(geom, (2, 8, 6, 6))
    assert merged == 8 * 4 * 4 * 9  # C_out * C_mid/g * C_in/g * k*k
    # 1x1 on the unpadded 6x6 input, then the strided 3x3 (padding its input) to 3x3 outputs
    assert convs == 2 * 6 * 6 * 8 * 4 + 2 * 3 * 3 * 8 * 4 * 9


def test_costs_count_only_the_taps_a_tiny_map_reads() -> None:
    """On 1x1 maps a 3x3 kxk runs its centre tap alone (ConvGeometry.conv crops it)."""
    merged, convs = composed_costs(geometry(8), (2, 8, 1, 1))
    assert merged == 8 * 8 * 8 * 9
    assert convs == 2 * 8 * 8 + 2 * 8 * 8 * 1


@pytest.mark.parametrize(("channels", "size", "batch", "expect_convs"), [
    (512, 1, 32, True),    # ResNet-18 layer4 at 32x32 input: the merge is C^3 k^2 = 1.2 G
    (512, 7, 8, True),     # layer4 at 224: 1.03 G vs 1.21 G (measured 0.85x the merge's time)
    (256, 2, 32, True),    # layer3 at 32x32 input: 84 M vs 151 M (measured 0.50x)
    (256, 4, 32, False),   # layer2-sized map in layer3: 336 M vs 151 M (measured 1.24x)
    (64, 8, 32, False),    # layer1 at 32x32 input: the merge is 2.4 M
    (64, 56, 8, False),    # layer1 at 224: the map is large
])
def test_auto_picks_the_cheaper_way(channels: int, size: int, batch: int, expect_convs: bool) -> None:
    geom = geometry(channels)
    assert run_composed_as_convs(geom, (batch, channels, size, size)) is expect_convs


def test_forced_executions_and_a_bad_one() -> None:
    geom = geometry(64)
    assert run_composed_as_convs(geom, (8, 64, 56, 56), "convs") is True
    assert run_composed_as_convs(geom, (8, 512, 1, 1), "assemble") is False
    with pytest.raises(ValueError, match="execution must be one of"):
        run_composed_as_convs(geom, (1, 64, 4, 4), "fast")
