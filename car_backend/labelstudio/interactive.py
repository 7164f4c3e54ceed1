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

from car_backend.engine.instances import split_instances
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
    """Where the annotator pointed: keypoints and rectangles that narrow a segmentation to the objects they
    pick (see narrow_instances)."""

    points: tuple[Point, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()

    def apply(self, seg: Segmentation) -> Segmentation:
        """`seg` narrowed to the pointed objects: the instances of its labels (engine.instances, SAM's objects
        where the engine found them), or of the object's mask in referring mode."""
        if seg.mode == "referring":
            return replace(seg, label_map=narrow_mask(seg.label_map == 1, self.points, self.boxes).astype(np.int32))
        found = split_instances(seg.label_map, np.ones(len(seg.queries)), parts=seg.parts)
        picked = narrow_instances(found.instance_map, self.points, self.boxes)
        lut = np.array((0, *found.labels), dtype=np.int32)  # instance j + 1 -> its label map value
        label_map = lut[picked]
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
    """(H, W) bool: the connected parts of `mask` picked by `points` and `boxes` (see narrow_instances)."""
    _, components = cv2.connectedComponents(np.asarray(mask).astype(np.uint8), connectivity=8)
    return narrow_instances(components, points, boxes) > 0


def narrow_instances(instance_map: np.ndarray, points: Sequence[Point],
                     boxes: Sequence[tuple[float, ...]] = ()) -> np.ndarray:
    """`instance_map` ((H, W) int, 0 = none, j + 1 = object j) with only the objects the annotator pointed at.

    Points: the objects that hold a positive point (all when no point is positive), less those that hold a
    negative one. Boxes (percent (x, y, width, height)): each keeps the objects with at least half their
    pixels inside it, whole; when none is, the part inside it of the object it overlaps most (the box then
    marks part of something larger). With both, an object must be picked by the points and by a box.
    """
    instance_map = np.asarray(instance_map)
    height, width = instance_map.shape
    areas = np.bincount(instance_map.ravel())
    keep = np.zeros(len(areas), dtype=bool)
    keep[1:] = areas[1:] > 0
    if any(p.positive for p in points):
        keep[1:] = False
        for point in points:
            if point.positive:
                keep[int(instance_map[_pixel(point.y, height), _pixel(point.x, width)])] = True
    for point in points:
        if not point.positive:
            keep[int(instance_map[_pixel(point.y, height), _pixel(point.x, width)])] = False
    keep[0] = False
    if not boxes:
        return np.where(keep[instance_map], instance_map, 0)
    out = np.zeros_like(instance_map)
    for x, y, w, h in boxes:
        x0, y0 = _pixel(x, width), _pixel(y, height)
        x1, y1 = _pixel(x + w, width) + 1, _pixel(y + h, height) + 1
        window = instance_map[y0:y1, x0:x1]
        inside = np.bincount(window.ravel(), minlength=len(areas))
        inside[0] = 0
        inside[~keep] = 0
        whole = np.flatnonzero((inside > 0) & (2 * inside >= areas))
        if len(whole):
            picked = np.isin(instance_map, whole)
            out[picked] = instance_map[picked]
        elif inside.any():
            best = int(np.argmax(inside))
            out[y0:y1, x0:x1][window == best] = best
    return out


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
