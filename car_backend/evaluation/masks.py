"""COCO-style object masks without pycocotools: polygons and run-length encodings decoded here.

RefCOCO's annotations are polygons; run-length encodings (plain `counts` lists or COCO's compressed
strings) are decoded too so crowd-style annotations do not need another dependency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from car_backend.labelstudio.regions import polygons_mask


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The (height, width) bool mask of a COCO `segmentation` field: a list of polygons or one RLE."""
    if isinstance(segmentation, Mapping):
        return rle_decode(segmentation)
    if isinstance(segmentation, Sequence) and all(isinstance(p, Sequence) for p in segmentation):
        return polygons_mask(segmentation, height, width)
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE ({'size': [h, w], 'counts': list or compressed string}) into a bool mask."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    runs = np.asarray(counts, np.int64)
    if runs.sum() != height * width:
        raise ValueError(f"RLE covers {int(runs.sum())} pixels, expected {height}x{width}")
    # Runs alternate 0, 1, 0, ... starting with zeros, over the mask in column-major order.
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T.copy()


def rle_counts_from_string(text: str) -> list[int]:
    """COCO's compressed counts: 5-bit little-endian groups offset by 48 ('0'), bit 0x20 = more groups,
    bit 0x10 of the last group = negative; from the third count on, each is a delta to the count two back."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value = 0
        shift = 0
        while True:
            group = ord(text[pos]) - 48
            pos += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    value -= 1 << shift
                break
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
