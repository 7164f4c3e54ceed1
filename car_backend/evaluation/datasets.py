"""Readers for the standard on-disk layouts of the evaluation datasets.

Each reader takes `root` (the dataset folder itself, or a folder that holds it under its usual name)
and a split, and returns the samples in a stable order. Layouts:

- Pascal VOC 2012: `VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/<split>.txt}`.
  Labels are palette PNGs whose indices are the classes: 0 = background, 1..20, 255 = ignore (object borders).
- COCO-Object: `images/<split>2017/*.jpg` and `annotations/<split>2017/<stem>_instanceTrainIds.png`, as written
  by GroupViT's `convert_coco_object.py` (used by TCL and CaR) from COCO-Stuff-164k: single-channel PNGs with
  0 = background (stuff classes), 1..80 = the COCO things in category-id order. That script maps COCO-Stuff's
  "unlabelled" 255 to 256 in a uint8 array, which wraps to 0, so the published files have no ignore value and
  unlabelled pixels count as background; a 255 that does appear is treated as ignore.
- Pascal Context: `VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext, ImageSets/SegmentationContext/
  <split>.txt}` as written by mmsegmentation's `pascal_context.py` conversion: 0 = background, 1..59 the
  59 classes (60-class evaluation keeps background as a class; the 59-class one ignores it).
- RefCOCO (UNC split): `refcoco/refs(unc).p` (the REFER pickle) and `refcoco/instances.json`, with the COCO
  train2014 images under `images/mscoco/images/train2014` (REFER's layout), `images/train2014` or `train2014`,
  next to `refcoco/` or one level up. Masks come from the referred annotation's polygons.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from car_backend.evaluation.masks import annotation_mask

log = logging.getLogger(__name__)

IGNORE = 255


class DatasetError(FileNotFoundError):
    """The dataset is not where we looked, or not in the layout we read; the message says what is missing."""


@dataclass(frozen=True)
class SemanticSample:
    """One image and its label PNG (dataset class ids, IGNORE where unlabelled)."""

    key: str
    image_path: Path
    label_path: Path

    def load_label(self) -> np.ndarray:
        return read_label_png(self.label_path)


@dataclass(frozen=True, eq=False)
class ReferringSample:
    """One referred object: its sentences and the COCO segmentation of its annotation."""

    key: str
    image_path: Path
    sentences: tuple[str, ...]
    segmentation: Any
    height: int
    width: int

    def load_mask(self) -> np.ndarray:
        return annotation_mask(self.segmentation, self.height, self.width)


Sample = SemanticSample | ReferringSample


def read_label_png(path: Path) -> np.ndarray:
    """Class ids of a label PNG: palette indices for 'P' images, the values for greyscale ones."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(f"{path}: label PNGs must be palette or single-channel, got mode {image.mode}")
        return np.asarray(image, dtype=np.int64)


def read_voc(root: Path, split: str = "val") -> list[SemanticSample]:
    base = _find_folder(root, ("", "VOC2012", "VOCdevkit/VOC2012"), "ImageSets/Segmentation")
    ids = _read_ids(base / "ImageSets/Segmentation" / f"{split}.txt")
    return [
        SemanticSample(i, base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids
    ]


def read_context(root: Path, split: str = "val") -> list[SemanticSample]:
    base = _find_folder(root, ("", "VOC2010", "VOCdevkit/VOC2010"), "ImageSets/SegmentationContext")
    ids = _read_ids(base / "ImageSets/SegmentationContext" / f"{split}.txt")
    return [
        SemanticSample(i, base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClassContext" / f"{i}.png")
        for i in ids
    ]


def read_coco_object(root: Path, split: str = "val") -> list[SemanticSample]:
    folder = f"{split}2017"
    base = _find_folder(root, ("", "coco_stuff164k", "coco"), f"annotations/{folder}")
    images = sorted(p for p in (base / "images" / folder).glob("*.jpg"))
    if not images:
        raise DatasetError(f"no .jpg images in {base / 'images' / folder}")
    samples = [
        SemanticSample(p.stem, p, base / "annotations" / folder / f"{p.stem}_instanceTrainIds.png") for p in images
    ]
    missing = [s.label_path for s in samples if not s.label_path.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} COCO-Object label maps are missing, e.g. {missing[0]}; convert COCO-Stuff-164k "
            "with GroupViT's convert_coco_object.py"
        )
    return samples


def read_refcoco(root: Path, split: str = "val", dataset: str = "refcoco", split_by: str = "unc") -> list[ReferringSample]:
    refs_name = f"refs({split_by}).p"
    data = _find_folder(root, (dataset, ""), refs_name)
    with open(data / refs_name, "rb") as f:
        refs = pickle.load(f)  # the REFER distribution format; only open files you trust
    with open(data / "instances.json") as f:
        instances = json.load(f)
    annotations = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    image_dir = _find_image_dir(data)

    samples = []
    for ref in refs:
        if ref["split"] != split:
            continue
        annotation = annotations[ref["ann_id"]]
        image = images[ref["image_id"]]
        samples.append(ReferringSample(
            key=str(ref["ref_id"]),
            image_path=image_dir / image["file_name"],
            sentences=tuple(clean_sentence(s["raw"]) for s in ref["sentences"]),
            segmentation=annotation["segmentation"],
            height=int(image["height"]),
            width=int(image["width"]),
        ))
    if not samples:
        splits = sorted({r["split"] for r in refs})
        raise DatasetError(f"no refs with split {split!r} in {data / refs_name}; it has: {', '.join(splits)}")
    return samples


def clean_sentence(sentence: str) -> str:
    """The official referring preprocessing: lower case, without double quotes and slashes."""
    return sentence.lower().replace('"', "").replace("/", "")


def _find_folder(root: Path, candidates: Iterable[str], marker: str) -> Path:
    """The first `root/candidate` that contains `marker`."""
    tried = [root / c if c else root for c in candidates]
    for folder in tried:
        if (folder / marker).exists():
            log.debug("dataset folder: %s", folder)
            return folder
    raise DatasetError(f"cannot find {marker} under any of: {', '.join(str(t) for t in tried)}")


def _find_image_dir(data: Path) -> Path:
    layouts = ("images/mscoco/images/train2014", "images/train2014", "train2014")
    tried = [base / layout for base in (data.parent, data) for layout in layouts]
    for folder in tried:
        if folder.is_dir():
            return folder
    raise DatasetError(f"cannot find the COCO train2014 images; tried: {', '.join(str(t) for t in tried)}")


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split file {path} not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
