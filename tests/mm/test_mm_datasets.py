"""``dyrep_fx_examples.datasets``: deepforest's tree crowns as COCO, Fashion-MNIST scenes as mmseg data."""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from dyrep_fx_examples import datasets
from dyrep_fx_examples.datasets import (
    DEEPFOREST_IMAGES,
    DEEPFOREST_VAL_IMAGES,
    FASHION_SEG_CLASSES,
    deepforest_coco,
    deepforest_data_dir,
    fashion_mnist_segmentation,
)


def test_deepforest_coco_keeps_every_hand_drawn_box(deepforest_root):
    from pycocotools.coco import COCO

    source = deepforest_data_dir()
    full = json.loads((deepforest_root / "annotations.json").read_text())
    assert [c["name"] for c in full["categories"]] == ["tree"]
    by_source: dict[str, list[dict]] = {}
    for im in full["images"]:
        by_source.setdefault(im["source_image"], []).append(im)
        with Image.open(deepforest_root / "images" / im["file_name"]) as tile:
            assert tile.size == (im["width"], im["height"]) == (400, 400)
    assert sorted(by_source) == sorted(DEEPFOREST_IMAGES.values())
    anns_of: dict[int, list[dict]] = {}
    for a in full["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
        x, y, w, h = a["bbox"]
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= 400 and y + h <= 400
    for xml_name, image_name in DEEPFOREST_IMAGES.items():
        boxes = np.array([[float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
                          for o in ET.parse(source / xml_name).getroot().iter("object")])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        seen, whole = set(), set()
        for im in by_source[image_name]:
            x0, y0 = im["x0"], im["y0"]
            clip = np.concatenate([np.maximum(boxes[:, :2], (x0, y0)),
                                   np.minimum(boxes[:, 2:], (x0 + 400, y0 + 400))], axis=1)
            for a in anns_of.get(im["id"], []):
                # Each annotation is one hand-drawn box clipped to the tile; less than half inside = iscrowd.
                x, y, w, h = a["bbox"]
                corners = (x + x0, y + y0, x + w + x0, y + h + y0)
                hit = np.flatnonzero(np.abs(clip - corners).max(axis=1) < 1e-6)
                assert hit.size, (xml_name, a)
                i = int(hit[0])
                visible = w * h / areas[i]
                assert a["iscrowd"] == int(visible < 0.5)
                seen.add(i)
                if np.isclose(visible, 1.0):
                    whole.add(i)
        assert seen == set(range(len(boxes))), xml_name  # no crown lost
        assert len(whole) >= 0.9 * len(boxes), (xml_name, len(whole), len(boxes))  # most are whole in a tile
    # The shipped crop tiles real crowns: 951 annotations in the four files.
    assert sum(len(list(ET.parse(source / x).getroot().iter("object"))) for x in DEEPFOREST_IMAGES) == 951
    # Splits: the two held-out NEON sites are the validation images, and pycocotools reads every file.
    val = COCO(str(deepforest_root / "val.json"))
    train = COCO(str(deepforest_root / "train.json"))
    val_sources = {DEEPFOREST_IMAGES[x] for x in DEEPFOREST_VAL_IMAGES}
    assert {im["source_image"] for im in val.dataset["images"]} == val_sources
    assert not val_sources & {im["source_image"] for im in train.dataset["images"]}
    assert len(val.getAnnIds()) == 61 + 37
    assert len(train.getImgIds()) + len(val.getImgIds()) == len(full["images"])


def test_deepforest_coco_multi_class_and_reuse(tmp_path, deepforest_root):
    out = deepforest_coco(tmp_path / "multi", tile=None, single_class=False)
    data = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["Tree", "Dead", "Alive"]
    assert len(data["images"]) == 4 and len(data["annotations"]) == 951
    counts = np.bincount([a["category_id"] for a in data["annotations"]], minlength=4)
    assert counts.tolist() == [0, 914, 28, 9]
    assert not any(a["iscrowd"] for a in data["annotations"])
    # A folder written with the same settings is reused as it is.
    stamp = (deepforest_root / "annotations.json").stat().st_mtime_ns
    assert deepforest_coco(deepforest_root) == deepforest_root
    assert (deepforest_root / "annotations.json").stat().st_mtime_ns == stamp


def test_deepforest_missing_names_the_package_and_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(datasets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepforest" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"deepforest.*pip install --no-deps deepforest==2\.1\.0"):
        deepforest_coco(tmp_path)


def test_fashion_segmentation_without_the_data_names_the_package_and_the_variable(monkeypatch, tmp_path):
    """Without root, the set-up cannot install Fashion-MNIST: the configs' data preparation (and so every test
    that trains on the scenes) then fails saying which Debian package to install and which variable to set."""
    empty = tmp_path / "no_fashion_mnist"
    empty.mkdir()
    monkeypatch.setenv("DYREP_FASHION_MNIST", str(empty))
    with pytest.raises(FileNotFoundError) as info:
        fashion_mnist_segmentation(tmp_path / "scenes", 2, size=64, n_val=1)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and "DYREP_FASHION_MNIST" in message
    assert str(empty) in message


def test_fashion_mnist_segmentation_layout_and_labels(tmp_path):
    out = fashion_mnist_segmentation(tmp_path, 3, size=96, n_val=2, grid=2, seed=1)
    meta = json.loads((out / "classes.json").read_text())
    assert meta["classes"] == list(FASHION_SEG_CLASSES) and len(meta["palette"]) == 11
    for split, n in (("train", 3), ("val", 2)):
        images = sorted((out / "img_dir" / split).glob("*.png"))
        labels = sorted((out / "ann_dir" / split).glob("*.png"))
        assert [p.name for p in images] == [p.name for p in labels] == [f"{i:05d}.png" for i in range(n)]
        for ip, lp in zip(images, labels):
            img = np.asarray(Image.open(ip))
            lab = np.asarray(Image.open(lp))
            assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and lab.shape == (96, 96)
            # Item pixels (brighter than the threshold) carry a class 1..10, the rest is background 0.
            assert ((img[..., 0] > 20) == (lab > 0)).all()
            assert lab.max() <= 10 and len(np.unique(lab)) >= 3
            # One item per 48 x 48 cell: at most one class in each cell.
            for cy in (0, 48):
                for cx in (0, 48):
                    cell = lab[cy:cy + 48, cx:cx + 48]
                    assert len(set(np.unique(cell)) - {0}) == 1
    # Deterministic: the same seed writes the same files.
    again = fashion_mnist_segmentation(tmp_path / "again", 3, size=96, n_val=2, grid=2, seed=1)
    for rel in ("img_dir/train/00002.png", "ann_dir/val/00001.png"):
        assert (out / rel).read_bytes() == (again / rel).read_bytes()
