"""Interactive pre-annotation: what the annotator just drew or typed, read from `/predict`'s `context`.

Label Studio sends the regions of the current labeling session in `params.context.result` (protocol spec
section 1.4): TextArea texts, smart keypoints (`is_positive` false when drawn with Alt), rectangles. All
coordinates there are percentages of the original image size, so they are kept in percent here and turned
into pixels only against the image actually segmented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from car_backend.engine.result import Segmentation
from car_backend.labelstudio.config import LabelSpec

_LABEL_KEYS = ("keypointlabels", "rectanglelabels", "brushlabels", "polygonlabels", "labels")


@dataclass(frozen=True)
class Point:
    x: float  # percent of the image width
    y: float  # percent of the image height
    positive: bool
    label: str | None = None


@dataclass(frozen=True)
class InteractiveRequest:
    texts: tuple[str, ...]
    label: str | None  # the label the annotator selected on a drawn region, if any
    points: tuple[Point, ...]
    boxes: tuple[tuple[float, float, float, float], ...]  # (x, y, width, height) in percent

    @property
    def empty(self) -> bool:
        return not (self.texts or self.points or self.boxes)


@dataclass(frozen=True)
class Focus:
    """Where the annotator pointed: keypoints and rectangles that narrow a segmentation (see narrow_mask)."""

    points: tuple[Point, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()

    def apply(self, seg: Segmentation) -> Segmentation:
        """`seg` with every label's mask (the object's, in referring mode) narrowed to the pointed parts."""
        if seg.mode == "referring":
            return replace(seg, label_map=narrow_mask(seg.label_map == 1, self.points, self.boxes).astype(np.int32))
        label_map = np.zeros_like(seg.label_map)
        for i in range(len(seg.queries)):
            label_map[narrow_mask(seg.label_map == i + 1, self.points, self.boxes)] = i + 1
        masks = seg.masks & (label_map[None] == np.arange(1, len(seg.queries) + 1)[:, None, None])
        return replace(seg, label_map=label_map, masks=masks)


def focus_of(request: InteractiveRequest | None, label: str | None) -> Focus | None:
    """The keypoints (those drawn with `label` or with no label) and rectangles of a request, if any."""
    if request is None:
        return None
    points = tuple(p for p in request.points if p.label is None or label is None or p.label == label)
    return Focus(points, request.boxes) if points or request.boxes else None


def parse_context(context: object) -> InteractiveRequest | None:
    """The annotator's prompt in `context`, or None when there is no usable context (batch prediction)."""
    if not isinstance(context, dict):
        return None
    regions = context.get("result")
    if not isinstance(regions, list):
        return None
    texts: list[str] = []
    points: list[Point] = []
    boxes: list[tuple[float, float, float, float]] = []
    label = None
    for region in regions:
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            continue
        value = region["value"]
        kind = str(region.get("type", "")).lower()
        region_label = _first_label(value)
        label = label or region_label
        if kind == "textarea":
            texts += [t.strip() for t in _strings(value.get("text")) if t.strip()]
        elif kind in ("keypointlabels", "keypoint") and _numbers(value, "x", "y"):
            points.append(Point(float(value["x"]), float(value["y"]), region.get("is_positive", True) is not False,
                                region_label))
        elif kind in ("rectanglelabels", "rectangle") and _numbers(value, "x", "y", "width", "height"):
            boxes.append((float(value["x"]), float(value["y"]), float(value["width"]), float(value["height"])))
    request = InteractiveRequest(tuple(texts), label, tuple(points), tuple(boxes))
    return None if request.empty else request


def label_named_by(text: str, labels: Sequence[LabelSpec]) -> LabelSpec | None:
    """The label whose value or prompt (or one of its comma-separated synonyms) the text names."""
    wanted = text.strip().lower()
    for spec in labels:
        names = {spec.value.lower(), spec.prompt.lower(), *(s.strip().lower() for s in spec.prompt.split(","))}
        if wanted in names:
            return spec
    return None


def narrow_mask(mask: np.ndarray, points: Sequence[Point], boxes: Sequence[tuple[float, ...]] = ()) -> np.ndarray:
    """The connected parts of `mask` that hold a positive point (all parts when none) and no negative point,
    restricted to the union of `boxes` when there are any."""
    height, width = mask.shape
    mask = mask.astype(bool)
    if boxes:
        inside = np.zeros_like(mask)
        for x, y, w, h in boxes:
            x0, y0 = _pixel(x, width), _pixel(y, height)
            x1, y1 = _pixel(x + w, width) + 1, _pixel(y + h, height) + 1
            inside[y0:y1, x0:x1] = True
        mask = mask & inside
    if not points or not mask.any():
        return mask
    _, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    hit = {True: set(), False: set()}
    for point in points:
        component = int(components[_pixel(point.y, height), _pixel(point.x, width)])
        if component:
            hit[point.positive].add(component)
    keep = hit[True] if any(p.positive for p in points) else set(range(1, int(components.max()) + 1))
    keep -= hit[False]
    return np.isin(components, sorted(keep)) if keep else np.zeros_like(mask)


def _pixel(percent: float, size: int) -> int:
    return int(min(max(percent / 100.0 * size, 0), size - 1))


def _first_label(value: dict) -> str | None:
    for key in _LABEL_KEYS:
        names = _strings(value.get(key))
        if names:
            return names[0]
    return None


def _strings(raw: object) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [s for s in raw if isinstance(s, str)]
    return []


def _numbers(value: dict, *keys: str) -> bool:
    """Whether every key holds a finite number (not a bool, NaN, infinity or an integer no float holds)."""
    return all(_finite(value.get(k)) for k in keys)


def _finite(number: object) -> bool:
    if not isinstance(number, int | float) or isinstance(number, bool):
        return False
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer too large for a float
        return False
