"""COCO-style object masks without pycocotools: polygons and run-length encodings decoded here.

RefCOCO's annotations are polygons; run-length encodings (plain `counts` lists or COCO's compressed
strings) are decoded too so crowd-style annotations do not need another dependency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """The (height, width) bool mask of a COCO `segmentation` field: a list of polygons or one RLE."""
    if isinstance(segmentation, Mapping):
        return rle_decode(segmentation)
    if isinstance(segmentation, Sequence) and all(isinstance(p, Sequence) for p in segmentation):
        return polygons_mask(segmentation, height, width)
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")


def polygons_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Union of COCO polygons ([x1, y1, x2, y2, ...] each) as a bool mask.

    COCO puts pixel (r, c) at [c, c+1) x [r, r+1); a pixel is inside when its centre is (even-odd rule,
    half-open edges), which is what pycocotools' rasteriser approximates. cv2.fillPoly is not used because it
    also fills every pixel the outline touches: about half a perimeter of extra pixels per object.
    """
    mask = np.zeros((height, width), bool)
    centres_x = np.arange(width) + 0.5
    for polygon in polygons:
        points = np.asarray(polygon, np.float64).reshape(-1, 2)
        if len(points) < 3:
            continue
        x0, y0 = points[:, 0], points[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        first = max(int(np.floor(y0.min() - 0.5)), 0)
        last = min(int(np.ceil(y0.max() - 0.5)), height - 1)
        for row in range(first, last + 1):
            y = row + 0.5
            crossing = (y0 <= y) != (y1 <= y)
            if not crossing.any():
                continue
            e = crossing.nonzero()[0]
            xs = np.sort(x0[e] + (y - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e]))
            mask[row] |= np.searchsorted(xs, centres_x, side="right") % 2 == 1
    return mask


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
