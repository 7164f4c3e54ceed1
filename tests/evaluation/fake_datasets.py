"""Tiny datasets in each standard layout, plus an oracle segmenter that reads the answer off the image.

Every generated image hides its label map in the red channel (0 where the label is ignored). Images are
stored losslessly (PNG data under the usual .jpg name; PIL reads files by content), so the oracle can read
the labels back exactly.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from car_backend.engine.result import Segmentation

WIDTH, HEIGHT = 64, 48
VOC_PALETTE = [v for i in range(256) for v in (i * 37 % 256, i * 91 % 256, i * 53 % 256)]


def label_map(seed: int, classes: tuple[int, ...], ignore_border: bool = False) -> np.ndarray:
    """Background with one rectangle per class (later ones on top) and optionally a 255 border."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    for c in classes:
        x0, y0 = int(rng.integers(0, WIDTH - 20)), int(rng.integers(0, HEIGHT - 14))
        w, h = int(rng.integers(10, 20)), int(rng.integers(8, 14))
        labels[y0:y0 + h, x0:x0 + w] = c
        if ignore_border:
            labels[y0, x0:x0 + w] = 255
    return labels


def write_image(path: Path, hidden: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    red = np.where(hidden == 255, 0, hidden).astype(np.uint8)
    green = np.full_like(red, 120)
    blue = np.tile(np.linspace(0, 255, WIDTH, dtype=np.uint8), (HEIGHT, 1))
    Image.fromarray(np.stack([red, green, blue], axis=-1)).save(path, format="PNG")


def write_label(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8))
    if palette:
        image.putpalette(VOC_PALETTE)
    image.save(path, format="PNG")


def make_voc(root: Path, labels: dict[str, np.ndarray], split: str = "val") -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for key, lab in labels.items():
        write_image(base / "JPEGImages" / f"{key}.jpg", lab)
        write_label(base / "SegmentationClass" / f"{key}.png", lab, palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{k}\n" for k in labels))
    return base


def make_context(root: Path, labels: dict[str, np.ndarray], split: str = "val") -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    for key, lab in labels.items():
        write_image(base / "JPEGImages" / f"{key}.jpg", lab)
        write_label(base / "SegmentationClassContext" / f"{key}.png", lab)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("".join(f"{k}\n" for k in labels))
    return base


def make_coco_object(root: Path, labels: dict[str, np.ndarray]) -> Path:
    for key, lab in labels.items():
        write_image(root / "images" / "val2017" / f"{key}.jpg", lab)
        write_label(root / "annotations" / "val2017" / f"{key}_instanceTrainIds.png", lab)
        # COCO-Stuff's own label files sit in the same folder; the reader must skip them.
        write_label(root / "annotations" / "val2017" / f"{key}.png", np.full_like(lab, 7))
    return root


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE of a bool mask (column-major runs, starting with zeros)."""
    flat = mask.T.ravel().astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], changes])).tolist()


def make_refcoco(root: Path, dataset: str = "refcoco", split_by: str = "unc"
                 ) -> tuple[Path, dict[str, tuple[tuple[str, ...], np.ndarray]]]:
    """root/<dataset>/{refs(<split_by>).p, instances.json} + root/images/mscoco/images/train2014.

    Returns the expected val samples: ref id -> (cleaned sentences, mask).
    """
    rectangle = np.zeros((HEIGHT, WIDTH), bool)
    rectangle[10:30, 5:25] = True
    blob = np.zeros((HEIGHT, WIDTH), bool)
    blob[20:40, 30:60] = True
    blob[25:30, 40:45] = False
    images = [
        {"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "height": HEIGHT, "width": WIDTH},
        {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "height": HEIGHT, "width": WIDTH},
    ]
    annotations = [
        # Polygon corners on pixel edges: covers rows 10..29 and columns 5..24 exactly.
        {"id": 101, "image_id": 11, "category_id": 1, "iscrowd": 0, "segmentation": [[5, 10, 25, 10, 25, 30, 5, 30]]},
        {"id": 102, "image_id": 12, "category_id": 2, "iscrowd": 0,
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": rle_counts(blob)}},
        {"id": 103, "image_id": 12, "category_id": 3, "iscrowd": 0, "segmentation": [[0, 0, 9, 0, 9, 9]]},
    ]
    refs = [
        {"ref_id": 7, "ann_id": 101, "image_id": 11, "category_id": 1, "split": "val", "sent_ids": [1, 2],
         "file_name": "COCO_train2014_000000000011_101.jpg",
         "sentences": [{"raw": 'The "Left" Box', "sent": "the left box", "sent_id": 1, "tokens": []},
                       {"raw": "red/blue square", "sent": "red blue square", "sent_id": 2, "tokens": []}]},
        {"ref_id": 8, "ann_id": 102, "image_id": 12, "category_id": 2, "split": "val", "sent_ids": [3],
         "file_name": "COCO_train2014_000000000012_102.jpg",
         "sentences": [{"raw": "Right blob", "sent": "right blob", "sent_id": 3, "tokens": []}]},
        {"ref_id": 9, "ann_id": 103, "image_id": 12, "category_id": 3, "split": "testA", "sent_ids": [4],
         "file_name": "COCO_train2014_000000000012_103.jpg",
         "sentences": [{"raw": "corner", "sent": "corner", "sent_id": 4, "tokens": []}]},
    ]
    data = root / dataset
    data.mkdir(parents=True)
    with open(data / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f)
    (data / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": [{"id": 1, "name": "x"}]}))
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    write_image(image_dir / images[0]["file_name"], rectangle.astype(np.uint8))
    write_image(image_dir / images[1]["file_name"], blob.astype(np.uint8))
    expected = {"7": (('the left box', "redblue square"), rectangle), "8": (("right blob",), blob)}
    return data, expected


class OracleSegmenter:
    """Answers with the label hidden in the image; `label_of` maps each query to its dataset label."""

    def __init__(self, label_of: dict[str, int] | None = None) -> None:
        self.label_of = label_of or {}
        self.calls: list[dict] = []

    def segment(self, image, queries, preset=None, mode="semantic", background=None) -> Segmentation:
        self.calls.append({"queries": list(queries), "preset": preset, "mode": mode, "background": background})
        hidden = np.asarray(image)[..., 0].astype(np.int32)
        result = np.zeros(hidden.shape, np.int32)
        if mode == "referring":
            result[hidden > 0] = 1
        else:
            for i, query in enumerate(queries):
                result[hidden == self.label_of[query]] = i + 1
        masks = np.stack([result == i + 1 for i in range(len(queries))])
        scores = np.array([float(m.any()) for m in masks], np.float32)
        return Segmentation(list(queries), result, masks, scores, steps=2, mode=mode)
