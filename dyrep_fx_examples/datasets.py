"""Real, offline data for the OpenMMLab configs in ``mm_configs/cpu``: detection and segmentation folders.

* :func:`deepforest_coco`: the hand-annotated aerial tree images that the PyPI package ``deepforest``
  (2.1.0) ships in ``deepforest/data`` (NEON airborne RGB, Pascal-VOC XML boxes), cut into tiles and
  written as a COCO detection folder that mmdet's ``CocoDataset`` reads.
* :func:`fashion_mnist_segmentation`: scenes composed of real Fashion-MNIST items with their pixel masks
  as labels, written in mmseg's ``BaseSegDataset`` layout (``img_dir/<split>``, ``ann_dir/<split>``).
* :func:`fashion_mnist_classification`: real Fashion-MNIST items as class folders of PNG files with
  annotation lists, the layout mmpretrain's ``CustomDataset`` reads.

Neither function downloads anything. ``deepforest`` is only read from disk, never imported (its import
needs pytorch-lightning, geopandas, rasterio, ...): install it without dependencies,
``pip install --no-deps deepforest==2.1.0``. Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``
package (see :mod:`dyrep_fx_examples.data`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = [
    "DEEPFOREST_IMAGES",
    "DEEPFOREST_VERSION",
    "DEEPFOREST_VAL_IMAGES",
    "FASHION_SEG_CLASSES",
    "FASHION_CLS_FOLDERS",
    "FASHION_SEG_PALETTE",
    "TREE_CLASSES",
    "deepforest_coco",
    "deepforest_data_dir",
    "fashion_mnist_classification",
    "fashion_mnist_segmentation",
]

#: The deepforest release whose data files this module knows.
DEEPFOREST_VERSION = "2.1.0"
#: Annotation file -> image file, in ``deepforest/data``. ``OSBS_029.xml`` names ``OSBS_029.tif``; the
#: shipped ``OSBS_029.png`` holds the same pixels (checked) and needs no TIFF reader.
DEEPFOREST_IMAGES: dict[str, str] = {
    "OSBS_029.xml": "OSBS_029.png",  # 400 x 400, 61 "Tree"
    "SOAP_061.xml": "SOAP_061.png",  # 400 x 400, 28 "Dead" + 9 "Alive"
    "2019_YELL_2_541000_4977000_image_crop.xml": "2019_YELL_2_541000_4977000_image_crop.png",  # 1249 x 1035
    "2019_YELL_2_528000_4978000_image_crop2.xml": "2019_YELL_2_528000_4978000_image_crop2.png",  # 2299 x 2472
}
#: Images held out for ``val.json``: two NEON sites (OSBS, SOAP) that the training tiles (YELL) never show.
DEEPFOREST_VAL_IMAGES: tuple[str, ...] = ("OSBS_029.xml", "SOAP_061.xml")
#: Category names of the single-class COCO file: "Tree", "Dead" and "Alive" are all tree crowns.
TREE_CLASSES: tuple[str, ...] = ("tree",)
_DEEPFOREST_LABELS: tuple[str, ...] = ("Tree", "Dead", "Alive")

#: Semantic classes of :func:`fashion_mnist_segmentation`: 0 is the background, ``1 + label`` an item.
FASHION_SEG_CLASSES: tuple[str, ...] = ("background",) + FASHION_MNIST_CLASSES
#: One RGB colour per class (mmseg's ``metainfo['palette']``).
FASHION_SEG_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)

#: Folder name of each Fashion-MNIST class in :func:`fashion_mnist_classification`, indexed by label: the
#: label first, so that sorting the folders (what ``CustomDataset`` does without a list) keeps the labels.
FASHION_CLS_FOLDERS: tuple[str, ...] = tuple(
    f"{i}_{name.lower().replace('/', '_').replace(' ', '_')}" for i, name in enumerate(FASHION_MNIST_CLASSES))

_INSTALL_HINT = (f"install it without its (heavy) dependencies into this environment: "
                 f"`pip install --no-deps deepforest=={DEEPFOREST_VERSION}` (only its data files are read)")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - torchvision depends on pillow
        raise ImportError("writing the data folders needs Pillow (`pip install pillow`)") from exc
    return Image


# -- deepforest --------------------------------------------------------------------------------------


def deepforest_data_dir() -> Path:
    """``deepforest/data`` of the installed ``deepforest`` package, found without importing it.

    Raises:
        FileNotFoundError: if ``deepforest`` is not installed, or its data folder lacks the annotated
            images of release 2.1.0; the message says how to install it.
    """
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package 'deepforest' is not installed; {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    wanted = [name for pair in DEEPFOREST_IMAGES.items() for name in pair]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if missing:
        try:
            version = importlib.metadata.version("deepforest")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        raise FileNotFoundError(
            f"deepforest {version} at {folder.parent} lacks the annotated images {missing}; this code reads "
            f"the files of deepforest {DEEPFOREST_VERSION}: {_INSTALL_HINT}")
    return folder


@dataclass
class _Box:
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    label: str


def _read_voc(path: Path) -> tuple[int, int, list[_Box]]:
    """``(width, height, boxes)`` of a Pascal-VOC annotation file (pixel corners, as written)."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: no <size> element")
    width, height = int(size.findtext("width", "0")), int(size.findtext("height", "0"))
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        corners = [float(bb.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(_Box(*corners, label=(obj.findtext("name") or "").strip()))
    return width, height, boxes


def _tile_starts(length: int, tile: int) -> list[int]:
    """Tile origins covering ``[0, length)``: evenly spread, the last one flush with the end (overlap)."""
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _coco_box(box: _Box, x0: int, y0: int, w: int, h: int) -> tuple[list[float], float] | None:
    """The part of ``box`` inside the tile, in tile coordinates as COCO ``[x, y, w, h]``, and its visible
    fraction of the whole box; None when nothing of it is inside."""
    area = max(box.xmax - box.xmin, 0.0) * max(box.ymax - box.ymin, 0.0)
    x1, y1 = max(box.xmin, x0), max(box.ymin, y0)
    x2, y2 = min(box.xmax, x0 + w), min(box.ymax, y0 + h)
    if x2 <= x1 or y2 <= y1 or area <= 0:
        return None
    return [x1 - x0, y1 - y0, x2 - x1, y2 - y1], (x2 - x1) * (y2 - y1) / area


def deepforest_coco(
    out_dir: str | os.PathLike[str],
    tile: int | None = 400,
    min_visible: float = 0.5,
    single_class: bool = True,
) -> Path:
    """Write deepforest's annotated tree images as a COCO detection folder; return the folder.

    The four annotated images of ``deepforest==2.1.0`` (:data:`DEEPFOREST_IMAGES`, 951 hand-drawn crown
    boxes) are cut into ``tile x tile`` crops (origins spread evenly, the last tile flush with the image
    edge, so neighbouring tiles may overlap; ``tile=None`` keeps whole images). A box that is at least
    ``min_visible`` inside a tile is kept, clipped to it; a box less visible than that becomes a COCO
    ``iscrowd=1`` region: pycocotools does not count detections there as false positives, and mmdet keeps
    it out of the training targets (``ignored_instances``).

    Classes: with ``single_class`` (default) the labels "Tree", "Dead" and "Alive" (only SOAP_061 tells
    dead from alive) are all category 1 ``"tree"`` (:data:`TREE_CLASSES`); otherwise categories 1..3 are
    ``"Tree"``, ``"Dead"``, ``"Alive"``.

    Written in ``out_dir``: ``images/*.png`` (lossless crops), ``annotations.json`` (every tile),
    ``train.json`` (the YELL tiles) and ``val.json`` (OSBS_029 and SOAP_061, held out as unseen sites; see
    :data:`DEEPFOREST_VAL_IMAGES`). A folder written before with the same settings is reused as is.

    Raises:
        FileNotFoundError: when ``deepforest`` (2.1.0) is not installed; the message gives the pip command.
    """
    if tile is not None and tile < 32:
        raise ValueError(f"tile must be at least 32 pixels (or None), got {tile}")
    if not 0.0 < min_visible <= 1.0:
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    source = deepforest_data_dir()
    out = Path(out_dir)
    settings = {"source": f"deepforest {DEEPFOREST_VERSION}", "tile": tile, "min_visible": min_visible,
                "single_class": single_class}
    stamp = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    files = [out / n for n in ("annotations.json", "train.json", "val.json")]
    if all(f.is_file() for f in files):
        try:
            written = json.loads(files[0].read_text())
            if written.get("info", {}).get("stamp") == stamp and all(
                    (out / "images" / im["file_name"]).is_file() for im in written["images"]):
                return out
        except (OSError, ValueError, KeyError, TypeError):
            pass
    Image = _pil()
    names = TREE_CLASSES if single_class else _DEEPFOREST_LABELS
    categories = [{"id": i + 1, "name": n, "supercategory": "tree"} for i, n in enumerate(names)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for xml_name, image_name in DEEPFOREST_IMAGES.items():
        width, height, boxes = _read_voc(source / xml_name)
        unknown = {b.label for b in boxes} - set(_DEEPFOREST_LABELS)
        if unknown:
            raise ValueError(f"{xml_name}: unexpected labels {sorted(unknown)}")
        with Image.open(source / image_name) as im:
            picture = im.convert("RGB")
        if picture.size != (width, height):
            raise ValueError(f"{image_name} is {picture.size}, its annotation says {(width, height)}")
        tw, th = (width, height) if tile is None else (min(tile, width), min(tile, height))
        stem = Path(image_name).stem
        for y0 in _tile_starts(height, th):
            for x0 in _tile_starts(width, tw):
                image_id = len(images) + 1
                file_name = f"{stem}_x{x0}_y{y0}.png" if tile is not None else f"{stem}.png"
                picture.crop((x0, y0, x0 + tw, y0 + th)).save(out / "images" / file_name)
                images.append({"id": image_id, "file_name": file_name, "width": tw, "height": th,
                               "source_image": image_name, "x0": x0, "y0": y0,
                               "split": "val" if xml_name in DEEPFOREST_VAL_IMAGES else "train"})
                for box in boxes:
                    inside = _coco_box(box, x0, y0, tw, th)
                    if inside is None:
                        continue
                    bbox, visible = inside
                    if min(bbox[2], bbox[3]) < 1.0:
                        continue
                    category = 1 if single_class else _DEEPFOREST_LABELS.index(box.label) + 1
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": category, "bbox": bbox, "area": bbox[2] * bbox[3],
                                        "iscrowd": int(visible < min_visible)})
    info = {"description": "deepforest 2.1.0 annotated NEON aerial images (MIT package; NEON imagery), "
                           "tiled by dyrep_fx_examples.datasets.deepforest_coco", "stamp": stamp, **settings}
    for path, split in zip(files, (None, "train", "val")):
        keep = [im for im in images if split is None or im["split"] == split]
        ids = {im["id"] for im in keep}
        data = {"info": info, "images": keep, "categories": categories,
                "annotations": [a for a in annotations if a["image_id"] in ids]}
        path.write_text(json.dumps(data))
    return out


# -- Fashion-MNIST segmentation ------------------------------------------------------------------------


def _compose(images: np.ndarray, labels: np.ndarray, size: int, grid: int, threshold: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``size x size`` scene: ``grid x grid`` cells, each holding one item at a random scale and
    position inside its cell. Returns the RGB image (``uint8``, H x W x 3) and the label map (``uint8``)."""
    Image = _pil()
    canvas = np.zeros((size, size), np.uint8)
    label_map = np.zeros((size, size), np.uint8)
    cell = size // grid
    for k, (item, label) in enumerate(zip(images, labels)):
        side = int(rng.integers(max(8, round(0.55 * cell)), cell + 1))
        resized = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))
        cy, cx = (k // grid) * cell, (k % grid) * cell
        y0 = cy + int(rng.integers(0, cell - side + 1))
        x0 = cx + int(rng.integers(0, cell - side + 1))
        fg = resized > threshold
        canvas[y0:y0 + side, x0:x0 + side] = np.maximum(canvas[y0:y0 + side, x0:x0 + side], resized)
        label_map[y0:y0 + side, x0:x0 + side][fg] = int(label) + 1
    return np.repeat(canvas[:, :, None], 3, axis=2), label_map


def fashion_mnist_segmentation(
    out_dir: str | os.PathLike[str],
    n_images: int,
    size: int = 128,
    *,
    n_val: int = 4,
    grid: int = 2,
    threshold: int = 20,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a semantic segmentation folder of real Fashion-MNIST scenes; return the folder.

    Each scene is a ``size x size`` RGB (grey) image cut into ``grid x grid`` cells; every cell holds one
    real Fashion-MNIST item, upscaled to a random 55-100% of the cell at a random place inside it. The
    label map comes from the item's own pixels: pixels brighter than ``threshold`` get ``1 + label``
    (:data:`FASHION_SEG_CLASSES`, 11 classes), everything else is background 0 (a real class, so mmseg's
    ``reduce_zero_label`` stays False). The ``n_images`` training scenes use the train split, the
    ``n_val`` validation scenes the test split; items are drawn with ``seed`` (deterministic).

    Layout (mmseg ``BaseSegDataset`` with ``img_suffix='.png'``, ``seg_map_suffix='.png'``)::

        out_dir/img_dir/{train,val}/00000.png   RGB scenes
        out_dir/ann_dir/{train,val}/00000.png   uint8 label maps (0..10)
        out_dir/classes.json                    {"classes": [...], "palette": [...]}

    Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` (or ``root`` / ``$DYREP_FASHION_MNIST``,
    see :func:`dyrep_fx_examples.data.fashion_mnist_root`).
    """
    if n_images < 1 or n_val < 0:
        raise ValueError(f"need n_images >= 1 and n_val >= 0, got {n_images} and {n_val}")
    if grid < 1 or size // grid < 8:
        raise ValueError(f"size // grid must be at least 8 pixels, got size={size}, grid={grid}")
    Image = _pil()
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    per_scene = grid * grid
    for split, count, source in (("train", n_images, "train"), ("val", n_val, "test")):
        img_dir, ann_dir = out / "img_dir" / split, out / "ann_dir" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*img_dir.glob("*.png"), *ann_dir.glob("*.png")]:
            stale.unlink()
        if count == 0:
            continue
        images, labels = load_fashion_mnist(source, root=root)
        pick = rng.choice(len(labels), size=count * per_scene, replace=False)
        items, classes = images.numpy()[pick], labels.numpy()[pick]
        for i in range(count):
            sl = slice(i * per_scene, (i + 1) * per_scene)
            picture, label_map = _compose(items[sl], classes[sl], size, grid, threshold, rng)
            Image.fromarray(picture, "RGB").save(img_dir / f"{i:05d}.png")
            Image.fromarray(label_map, "L").save(ann_dir / f"{i:05d}.png")
    meta = {"classes": list(FASHION_SEG_CLASSES), "palette": [list(c) for c in FASHION_SEG_PALETTE],
            "n_train": n_images, "n_val": n_val, "size": size, "grid": grid, "seed": seed}
    (out / "classes.json").write_text(json.dumps(meta, indent=1))
    return out


# -- Fashion-MNIST classification ----------------------------------------------------------------------


def _write_class_split(out: Path, split: str, items: np.ndarray, labels: np.ndarray, size: int) -> None:
    """``out/<split>/<class folder>/<index>.png`` (RGB, ``size`` pixels square) and ``out/meta/<split>.txt``
    (one ``<class folder>/<file> <label>`` line per image, in index order)."""
    Image = _pil()
    root = out / split
    for stale in root.glob("*/*.png"):
        stale.unlink()
    lines = []
    for i, (item, label) in enumerate(zip(items, labels)):
        folder = FASHION_CLS_FOLDERS[int(label)]
        (root / folder).mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(item)
        if size != picture.width:
            picture = picture.resize((size, size), Image.BILINEAR)
        picture.convert("RGB").save(root / folder / f"{i:05d}.png")
        lines.append(f"{folder}/{i:05d}.png {int(label)}")
    (out / "meta").mkdir(parents=True, exist_ok=True)
    (out / "meta" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def fashion_mnist_classification(
    out_dir: str | os.PathLike[str],
    n_train: int,
    n_val: int = 200,
    size: int = 28,
    *,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write real Fashion-MNIST items as an image classification folder; return the folder.

    ``n_train`` items of the train split and ``n_val`` of the test split are drawn with ``seed``
    (deterministic, without replacement, every class about equally often) and saved as RGB PNG files (the
    grey item in all three channels, so the classifier takes three channels like a detector's backbone),
    upscaled to ``size`` pixels square if ``size`` is not 28.

    Layout (mmpretrain's ``CustomDataset``, ``data_prefix='train'`` with ``ann_file='meta/train.txt'``, or
    with the class folders alone)::

        out_dir/train/<k>_<class>/00000.png   k = the label (FASHION_CLS_FOLDERS)
        out_dir/val/<k>_<class>/00000.png
        out_dir/meta/train.txt                "<k>_<class>/00000.png <k>" per line
        out_dir/meta/val.txt
        out_dir/classes.json                  {"classes": [...], "folders": [...], ...}

    Fashion-MNIST is read from Debian's ``dataset-fashion-mnist`` (or ``root`` / ``$DYREP_FASHION_MNIST``,
    see :func:`dyrep_fx_examples.data.fashion_mnist_root`).
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"need n_train >= 1 and n_val >= 1, got {n_train} and {n_val}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split, count, source in (("train", n_train, "train"), ("val", n_val, "test")):
        images, labels = load_fashion_mnist(source, root=root)
        pick = _balanced_pick(labels.numpy(), count, rng)
        _write_class_split(out, split, images.numpy()[pick], labels.numpy()[pick], size)
    meta = {"classes": list(FASHION_MNIST_CLASSES), "folders": list(FASHION_CLS_FOLDERS), "n_train": n_train,
            "n_val": n_val, "size": size, "seed": seed}
    (out / "classes.json").write_text(json.dumps(meta, indent=1))
    return out


def _balanced_pick(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices into ``labels``, the classes taking turns (so a small split holds every class),
    each class's items in random order."""
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx for rank in zip(*per_class) for idx in rank]
    if count > len(order):
        raise ValueError(f"asked for {count} items, the split has {len(order)} in equal numbers per class")
    return np.asarray(order[:count])
