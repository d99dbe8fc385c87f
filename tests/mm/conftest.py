"""Data folders for the OpenMMLab tests, written once per session from real images (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def deepforest_root(tmp_path_factory) -> Path:
    """deepforest 2.1.0's annotated aerial tree images as a tiled COCO folder."""
    from dyrep_fx_examples.datasets import deepforest_coco

    return deepforest_coco(tmp_path_factory.mktemp("deepforest_coco"))


@pytest.fixture(scope="session")
def fashion_seg_root(tmp_path_factory) -> Path:
    """8 training and 2 validation Fashion-MNIST segmentation scenes of 128 x 128."""
    from dyrep_fx_examples.datasets import fashion_mnist_segmentation

    return fashion_mnist_segmentation(tmp_path_factory.mktemp("fashion_seg"), 8, 128, n_val=2)


@pytest.fixture(scope="session")
def fashion_cls_root(tmp_path_factory) -> Path:
    """96 training and 30 validation Fashion-MNIST items as mmpretrain class folders (28 x 28 PNG)."""
    from dyrep_fx_examples.datasets import fashion_mnist_classification

    return fashion_mnist_classification(tmp_path_factory.mktemp("fashion_cls"), 96, 30)
