"""Label Studio results read back into masks: brush (RLE) and polygon regions -> one bool mask per label
(`label_masks`), or brush, polygon and rectangle regions -> one mask per region (`region_instances`, each
region one object instance; a rectangle is its filled box), and `choices` -> image-level tags
(`result_choices`). Sizes a region claims are checked against a pixel limit before anything is allocated.

Polygons are read the way `car_backend.labelstudio.results` writes them: points run along pixel corners,
so a pixel belongs to a polygon when its centre is inside (cv2.fillPoly would add the pixels the outline
touches, a one-pixel band along the right and bottom edges).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle

REGION_TYPES = ("brushlabels", "polygonlabels")  # each keeps its label names under value[type]
INSTANCE_TYPES = (*REGION_TYPES, "rectanglelabels")
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
        check_sizes(regions, size, max_pixels)
    masks: dict[str, np.ndarray] = {}
    for region in regions:
        mask = region_mask(region, size)
        for label in _labels(region):
            add_mask(masks, label, mask)
    return masks


def check_sizes(regions: Iterable[dict], size: tuple[int, int], max_pixels: int) -> None:
    """RegionSizeError when `size` (H, W) or the original size a region claims is over `max_pixels`;
    ValueError when a region's original size is not positive whole numbers."""
    for where, (height, width) in [("the output", size)] + [
            (f"region {r.get('id', '?')}", s) for r in regions if (s := region_size(r)) is not None]:
        if height * width > max_pixels:
            raise RegionSizeError(f"{where} is {height}x{width} = {height * width} pixels, more than "
                                  f"CAR_MAX_IMAGE_PIXELS={max_pixels}")


def region_mask(region: dict, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask of one brush, polygon or rectangle region at `size`. Raises ValueError, KeyError or
    TypeError on a region of another shape."""
    height, width = size
    kind = region["type"]
    if kind == "brushlabels":
        return resize_mask(_brush_mask(region, region_size(region) or size), size)
    if kind == "rectanglelabels":
        return polygons_mask([rectangle_corners(region["value"], height, width).ravel()], height, width)
    points = np.asarray(region["value"]["points"], np.float64).reshape(-1, 2)
    return polygons_mask([points * [width / 100.0, height / 100.0]], height, width)


def rectangle_corners(value: dict, height: int, width: int) -> np.ndarray:
    """(4, 2) pixel (x, y) corners of a Label Studio rectangle: x, y, width, height in percent of the image,
    turned `rotation` degrees clockwise (on screen) about its top-left corner, as Label Studio draws it."""
    try:
        x, y, w, h = (float(value[key]) for key in ("x", "y", "width", "height"))
        rotation = float(value.get("rotation") or 0.0)
    except (TypeError, ValueError):
        raise ValueError("a rectangle with coordinates that are not numbers") from None
    x, y, w, h = x * width / 100.0, y * height / 100.0, w * width / 100.0, h * height / 100.0
    corners = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    angle = np.deg2rad(rotation)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = corners @ turn.T + [x, y]
    if not np.isfinite(corners).all():
        raise ValueError("a rectangle with coordinates that are not numbers")
    return corners


@dataclass(frozen=True, eq=False)
class RegionInstance:
    """One region read back as an object instance: `id` (the region's id, "" without one), `kind` (its type:
    brushlabels, polygonlabels or rectanglelabels), `labels` (its label names, usually one), `mask` ((H, W)
    bool at the size asked for) and `score` (the region's score, None without one)."""

    id: str
    kind: str
    labels: tuple[str, ...]
    mask: np.ndarray
    score: float | None


def region_instances(regions: Iterable[dict], size: tuple[int, int],
                     max_pixels: int | None = None) -> Iterator[RegionInstance]:
    """Each labelled brush, polygon and rectangle region of one result as an instance, in result order, made
    one at a time as the iterator is read (so a caller need hold one region's mask only).

    `size` (H, W) is the output size (brush masks drawn at another size are resized, nearest). With
    `max_pixels`, sizes are checked at the call (`check_sizes`: RegionSizeError before any mask is
    allocated). Reading the iterator raises ValueError, KeyError or TypeError on a region of another shape."""
    regions = [r for r in regions if _labels(r, INSTANCE_TYPES)]
    if max_pixels is not None:
        check_sizes(regions, size, max_pixels)
    return (_instance(region, size) for region in regions)


def _instance(region: dict, size: tuple[int, int]) -> RegionInstance:
    score = region.get("score")
    score = float(score) if isinstance(score, int | float) and np.isfinite(score) else None
    return RegionInstance(str(region.get("id") or ""), region["type"],
                          tuple(_labels(region, INSTANCE_TYPES)), region_mask(region, size), score)


def result_choices(result: Iterable[dict]) -> list[str]:
    """The choice values of a result's `choices` regions (image-level tags), each once, in the order met."""
    found: list[str] = []
    for region in result:
        value = region.get("value") if isinstance(region, dict) and region.get("type") == "choices" else None
        choices = value.get("choices") if isinstance(value, dict) else None
        if isinstance(choices, list):
            found.extend(v for v in choices if isinstance(v, str))
    return list(dict.fromkeys(found))


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


def _labels(region: dict, types: Sequence[str] = REGION_TYPES) -> list[str]:
    kind = region.get("type")
    if kind not in types or not isinstance(region.get("value"), dict):
        return []
    labels = region["value"].get(kind)
    return [v for v in labels if isinstance(v, str)] if isinstance(labels, list) else []


def region_size(region: dict) -> tuple[int, int] | None:
    """(H, W) a region claims (original_height/original_width), None without; ValueError unless both are
    positive whole numbers."""
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
        this = region_size(region)
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
