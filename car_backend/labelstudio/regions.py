"""Label Studio results read back into masks: brush (RLE) and polygon regions -> one bool mask per label.

Polygons are read the way `car_backend.labelstudio.results` writes them: points run along pixel corners,
so a pixel belongs to a polygon when its centre is inside (cv2.fillPoly would add the pixels the outline
touches, a one-pixel band along the right and bottom edges).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

REGION_TYPES = ("brushlabels", "polygonlabels")  # each keeps its label names under value[type]
SHRINK_MAX_SIDE = 256  # callers that store masks shrink them to this many pixels on the longer side


# ---- masks from regions ----


class RegionSizeError(ValueError):
    """A region claims an image larger than the pixel limit; raised before anything of that size is made."""


def label_masks(regions: Iterable[dict], size: tuple[int, int] | None = None,
                max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """The union (H, W) bool mask of each label over the brush and polygon regions of one result.

    Other region types and regions without a label are skipped; a region with several labels counts for
    each. `size` (H, W) sets the output size (brush masks drawn at another size are resized, nearest);
    without it every region's original_height/original_width must agree, and a ValueError says which
    region does not, or that there is no region to take the size from. With `max_pixels`, every size
    (the output's and each region's) is checked first: RegionSizeError before any mask is allocated, and a
    brush's RLE must announce exactly H x W x 4 values before it is decoded (ValueError otherwise).
    """
    regions = [r for r in regions if _labels(r)]
    if size is None:
        size = _common_size(regions)
    if max_pixels is not None:
        for where, (height, width) in [("the output", size)] + [
                (f"region {r.get('id', '?')}", s) for r in regions if (s := _region_size(r)) is not None]:
            if height * width > max_pixels:
                raise RegionSizeError(f"{where} is {height}x{width} = {height * width} pixels, more than "
                                      f"CAR_MAX_IMAGE_PIXELS={max_pixels}")
    height, width = size
    masks: dict[str, np.ndarray] = {}
    for region in regions:
        if region["type"] == "brushlabels":
            mask = resize_mask(_brush_mask(region, _region_size(region) or size), size)
        else:
            points = np.asarray(region["value"]["points"], np.float64).reshape(-1, 2)
            mask = polygons_mask([points * [width / 100.0, height / 100.0]], height, width)
        for label in _labels(region):
            add_mask(masks, label, mask)
    return masks


def add_mask(masks: dict[str, np.ndarray], label: str, mask: np.ndarray) -> None:
    """OR `mask` into `masks[label]` (set it when the label has none yet)."""
    masks[label] = masks[label] | mask if label in masks else mask


def shrink(masks: Mapping[str, np.ndarray], max_side: int = SHRINK_MAX_SIDE) -> dict[str, np.ndarray]:
    """The masks resized (nearest) so the longer side is at most `max_side`; smaller ones are kept."""
    out = {}
    for label, mask in masks.items():
        height, width = mask.shape
        scale = max_side / max(height, width)
        if scale < 1:
            mask = resize_mask(mask, (max(1, round(height * scale)), max(1, round(width * scale))))
        out[label] = mask
    return out


def _labels(region: dict) -> list[str]:
    kind = region.get("type")
    return list(region.get("value", {}).get(kind) or []) if kind in REGION_TYPES else []


def _region_size(region: dict) -> tuple[int, int] | None:
    """(H, W) from original_height/original_width; ValueError unless both are positive whole numbers."""
    height, width = region.get("original_height"), region.get("original_width")
    if not height or not width:
        return None
    try:
        size = (int(height), int(width))
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"region {region.get('id', '?')}: original_height/original_width are not numbers"
                         ) from None
    if min(size) <= 0 or size != (height, width):
        raise ValueError(f"region {region.get('id', '?')}: original_height/original_width must be positive "
                         "whole numbers")
    return size


def _common_size(regions: Sequence[dict]) -> tuple[int, int]:
    if not regions:
        raise ValueError("no brush or polygon region to take the image size from; pass size=(H, W)")
    size = None
    for region in regions:
        this = _region_size(region)
        if this is None:
            raise ValueError(f"region {region.get('id', '?')} has no original_height/original_width")
        if size is not None and this != size:
            raise ValueError(
                f"region {region.get('id', '?')} is {this[0]}x{this[1]} (H x W) but an earlier region "
                f"is {size[0]}x{size[1]}; pass size=(H, W) to compare them at one size"
            )
        size = this
    return size


def _brush_mask(region: dict, size: tuple[int, int]) -> np.ndarray:
    value = region["value"]
    if value.get("format", "rle") != "rle":
        raise ValueError(f"region {region.get('id', '?')}: brush format {value['format']!r} is not 'rle'")
    height, width = size
    rle = value.get("rle")
    if not isinstance(rle, list) or len(rle) < 5 or not all(isinstance(b, int) and 0 <= b < 256 for b in rle[:5]):
        raise ValueError(f"region {region.get('id', '?')}: the brush has no RLE byte list")
    announced = int.from_bytes(bytes(rle[:4]), "big")  # the first 32 bits: how many values decoding makes
    if announced != height * width * 4:
        raise ValueError(f"region {region.get('id', '?')}: RLE announces {announced // 4} pixels, not "
                         f"{height}x{width}")
    if len(rle) > 2 * announced + 64:  # literal runs cost at most ~9 bits a value: anything longer is not a mask
        raise ValueError(f"region {region.get('id', '?')}: the RLE is {len(rle)} bytes, too long for "
                         f"{height}x{width} pixels")
    try:
        rgba = decode_rle(rle)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"region {region.get('id', '?')}: the RLE cannot be decoded ({type(exc).__name__})"
                         ) from None
    if rgba.size != height * width * 4:
        raise ValueError(
            f"region {region.get('id', '?')}: RLE holds {rgba.size // 4} pixels, not {height}x{width}"
        )
    return rgba.reshape(height, width, 4)[:, :, 3] > 0


def resize_mask(mask: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    mask = np.asarray(mask, bool)
    if shape is None or mask.shape == tuple(shape):
        return mask
    height, width = shape
    return cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0


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
