"""Data folders for the OpenMMLab tests, written once per session from real images (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def deepforest_root(tmp_path_factory) -> Path:
    """deepforest 2.1.0's annotated aerial tree images as a tiled COCO folder."""
    from dyrep_fx.datasets import deepforest_coco

    return deepforest_coco(tmp_path_factory.mktemp("deepforest_coco"))


@pytest.fixture(scope="session")
def fashion_seg_root(tmp_path_factory) -> Path:
    """8 training and 2 validation Fashion-MNIST segmentation scenes of 128 x 128."""
    from dyrep_fx.datasets import fashion_mnist_segmentation

    return fashion_mnist_segmentation(tmp_path_factory.mktemp("fashion_seg"), 8, 128, n_val=2)
