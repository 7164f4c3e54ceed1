"""Turn CaR's `Segmentation` into Label Studio regions and prediction entries.

Brush regions carry an RLE of one label's pixels in the label map (`mask2rle` of a 0/255 uint8 mask at
the image's size). Polygons are traced on the label map along pixel corners, so the outline of a region
is exactly the edge of its pixels; the boundary between two classes is split at junctions (points where
three labels or the image border meet) into arcs, and each arc is simplified once and used by both
neighbours, so simplification opens no gap between them. Polygons have no holes: a region's outer outline
covers whatever it encloses, and the enclosed classes get their own polygons on top.

With instances (`car_regions="instances"`, CAR_REGIONS) every object of a label (engine.instances) is its own
brush or polygon region with its own score; rectangles are one box per object by default (the object's
pixel bounds in percent); a Choices control gets one `choices` region with the labels present.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from car_backend.engine.instances import MIN_AREA_PX, absorb_specks, bounds, split_instances
from car_backend.engine.result import Segmentation
from car_backend.labelstudio.config import RESULT_TYPES, LabelSpec, Target

PERCENT_DIGITS = 4


def segmentation_to_regions(
    seg: Segmentation,
    target: Target,
    labels: Sequence[LabelSpec],
    kind: str | None = None,
    polygon_tolerance: float = 1.0,
    min_area: int = MIN_AREA_PX,
    instances: bool = False,
) -> list[dict]:
    """Regions for one target. `labels[i]` names `seg.queries[i]` (in referring mode, `labels[0]` names
    the one object). `kind` overrides `target.kind`; `polygon_tolerance` is in pixels (0 = exact).

    `instances`: one brush, polygon or rectangle region per object (engine.instances.split_instances, with
    the engine's SAM objects when it has them), scored with the instance's score; else one brush per label,
    one polygon per connected part of a label, one rectangle around each label's pixels. A referring answer
    is one object either way. Choices: one region holding the labels present (every one when the target is
    `multiple`, best first, with their mean score; else the best one, with its score).
    """
    kind = kind or target.kind
    if kind not in RESULT_TYPES:
        raise ValueError(f"kind must be one of {', '.join(RESULT_TYPES)}, got {kind!r}")
    parts = seg.parts
    if seg.mode == "referring":
        if not labels:
            raise ValueError("referring mode needs one label to name the object")
        label_map = (seg.label_map == 1).astype(np.int32)
        scores = [float(np.max(seg.scores)) if len(seg.scores) else 0.0]
        labels = labels[:1]
        instances, parts = False, None
    else:
        if len(labels) != len(seg.queries):
            raise ValueError(f"{len(labels)} labels for {len(seg.queries)} queries; they must pair up")
        label_map = np.asarray(seg.label_map)
        scores = [float(s) for s in seg.scores]

    present = set(np.unique(label_map).tolist())
    classes = [i + 1 for i in range(len(labels)) if i + 1 in present]
    width, height = seg.size
    base = {
        "from_name": target.from_name,
        "to_name": target.to_name,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "readonly": False,
    }
    if kind == "choices":
        return _choices(base, [labels[k - 1].value for k in classes], [scores[k - 1] for k in classes],
                        target.multiple)
    if instances:
        found = split_instances(label_map, scores, classes, min_area, parts=parts)
        names = [labels[v - 1].value for v in found.labels]
        if kind == "brush":
            return [_region(base, "brushlabels", _rle(found.mask(j), names[j]), found.scores[j])
                    for j in range(len(found))]
        if kind == "rectangle":
            return [_region(base, "rectanglelabels", _box(found.box(j), width, height, names[j]), found.scores[j])
                    for j in range(len(found))]
        regions = []
        for j, rings in trace_polygons(found.instance_map, range(1, len(found) + 1), polygon_tolerance,
                                       min_area).items():
            for ring in rings:
                value = {"points": _percent(ring, width, height), "polygonlabels": [names[j - 1]], "closed": True}
                regions.append(_region(base, "polygonlabels", value, found.scores[j - 1]))
        return regions
    regions = []
    if kind == "brush":
        return [_region(base, "brushlabels", _rle(label_map == k, labels[k - 1].value), scores[k - 1])
                for k in classes]
    if kind == "rectangle":
        return [_region(base, "rectanglelabels", _box(bounds(label_map == k), width, height, labels[k - 1].value),
                        scores[k - 1]) for k in classes]
    for k, rings in trace_polygons(label_map, classes, polygon_tolerance, min_area).items():
        for ring in rings:
            points = _percent(ring, width, height)
            value = {"points": points, "polygonlabels": [labels[k - 1].value], "closed": True}
            regions.append(_region(base, "polygonlabels", value, scores[k - 1]))
    return regions


def prediction_entry(regions: list[dict], model_version: str, score: float | None = None) -> dict:
    """One task's answer to /predict; `score` defaults to the mean region score."""
    if score is None:
        region_scores = [r.get("score") for r in regions]
        finite = [float(s) for s in region_scores if isinstance(s, int | float) and math.isfinite(s)]
        score = sum(finite) / len(finite) if finite else 0.0
    score = float(score)
    return {
        "result": regions,
        "score": score if math.isfinite(score) else 0.0,
        "model_version": model_version,
    }


def pending_entry(model_version: str, reason: str) -> dict:
    """An answer Label Studio does not store (no "result"): it asks for the task again next time."""
    return {"model_version": model_version, "status": "pending", "reason": reason}


def failed_entry(model_version: str, reason: str) -> dict:
    """An empty prediction Label Studio stores, so it does not ask for the task again."""
    return {"result": [], "score": 0.0, "model_version": model_version, "error": reason}


def trace_polygons(
    label_map: np.ndarray, classes: Sequence[int], tolerance: float = 1.0, min_area: int = MIN_AREA_PX
) -> dict[int, list[np.ndarray]]:
    """Outer outlines of every connected part of each class, as (N, 2) float arrays of (x, y) pixel-corner
    coordinates (0..W, 0..H), simplified with `tolerance` pixels; classes without parts are left out."""
    label_map = absorb_specks(np.asarray(label_map, dtype=np.int32), classes, min_area)
    junctions = _junctions(label_map)
    simplify = _ArcSimplifier(tolerance)
    out: dict[int, list[np.ndarray]] = {}
    for k in classes:
        rings = [simplify.ring(ring, junctions) for ring in _outlines(label_map == k)]
        rings = [r for r in rings if len(r) >= 3]
        if rings:
            out[k] = [r.astype(np.float64) for r in rings]
    return out


def _rle(mask: np.ndarray, label: str) -> dict:
    """A brushlabels value: the RLE of an (H, W) bool mask as 0/255 (Label Studio shows alpha 1 as clear)."""
    return {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}


def _choices(base: dict, values: list[str], scores: list[float], multiple: bool) -> list[dict]:
    """The one choices region of the labels present (see segmentation_to_regions); none when no label is."""
    if not values:
        return []
    order = sorted(range(len(values)), key=lambda i: -scores[i])  # stable: equal scores keep label order
    chosen = order if multiple else order[:1]
    score = float(np.mean([scores[i] for i in chosen]))
    return [_region(base, "choices", {"choices": [values[i] for i in chosen]}, score)]


def _box(box: tuple[int, int, int, int], width: int, height: int, label: str) -> dict:
    """A rectanglelabels value for pixel bounds (x0, y0, x1, y1), x1/y1 exclusive, in percent of the image."""
    x0, y0, x1, y1 = box
    percent = [round(v, PERCENT_DIGITS) for v in (100.0 * x0 / width, 100.0 * y0 / height,
                                                    100.0 * (x1 - x0) / width, 100.0 * (y1 - y0) / height)]
    return {"x": percent[0], "y": percent[1], "width": percent[2], "height": percent[3], "rotation": 0,
            "rectanglelabels": [label]}


def _region(base: dict, type_: str, value: dict, score: float) -> dict:
    return {
        "id": uuid.uuid4().hex[:10],
        **base,
        "type": type_,
        "value": value,
        "score": score if math.isfinite(score) else 0.0,
    }


def _percent(ring: np.ndarray, width: int, height: int) -> list[list[float]]:
    pct = np.empty_like(ring, dtype=np.float64)
    pct[:, 0] = ring[:, 0] * (100.0 / width)
    pct[:, 1] = ring[:, 1] * (100.0 / height)
    return np.clip(np.round(pct, PERCENT_DIGITS), 0.0, 100.0).tolist()


def _junctions(label_map: np.ndarray) -> np.ndarray:
    """(H+1, W+1) bool over pixel corners: where 3+ labels meet (the outside counts), checkerboard
    corners, and the image's four corners. Simplification keeps these points."""
    padded = np.pad(label_map, 1, constant_values=-1)
    ul, ur, bl, br = padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]
    distinct = 1 + (ur != ul) + ((bl != ul) & (bl != ur)) + ((br != ul) & (br != ur) & (br != bl))
    junctions = (distinct >= 3) | ((ul == br) & (ur == bl) & (ul != ur))
    junctions[0, 0] = junctions[0, -1] = junctions[-1, 0] = junctions[-1, -1] = True
    return junctions


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Outer outlines of the mask's 8-connected parts along pixel corners: (N, 2) int (x, y) unit steps."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    y0, x0 = rows[0], cols[0]
    crop = mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
    # Double the resolution and grow each pixel's block by one step right and down: the set is then
    # closed on the half-pixel lattice, and its border runs exactly along the original pixel edges.
    fine = np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)
    grid = np.zeros((fine.shape[0] + 3, fine.shape[1] + 3), dtype=np.uint8)  # +1 zero margin all around
    grid[1:-2, 1:-2] |= fine
    grid[2:-1, 1:-2] |= fine
    grid[1:-2, 2:-1] |= fine
    grid[2:-1, 2:-1] |= fine
    contours, _ = cv2.findContours(grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outlines = []
    for contour in contours:
        pts = contour.reshape(-1, 2) - 1
        pts = _fill_diagonals(pts)
        corners = pts[(pts[:, 0] % 2 == 0) & (pts[:, 1] % 2 == 0)] // 2
        outlines.append(corners + np.array([x0, y0]))
    return outlines


def _fill_diagonals(pts: np.ndarray) -> np.ndarray:
    """OpenCV's 8-connected trace cuts concave corners with a diagonal step between two edge midpoints;
    put the skipped corner (the even-even point of the step) back."""
    nxt = np.roll(pts, -1, axis=0)
    step = nxt - pts
    diagonal = np.flatnonzero((step[:, 0] != 0) & (step[:, 1] != 0))
    if not len(diagonal):
        return pts
    a, b = pts[diagonal], nxt[diagonal]
    corner = np.where((a[:, :1] % 2 == 0), np.stack([a[:, 0], b[:, 1]], 1), np.stack([b[:, 0], a[:, 1]], 1))
    return np.insert(pts, diagonal + 1, corner, axis=0)


class _ArcSimplifier:
    """Douglas-Peucker per boundary arc, in a canonical direction, so both sides of an arc agree."""

    def __init__(self, tolerance: float):
        self.tolerance = float(tolerance)

    def ring(self, ring: np.ndarray, junctions: np.ndarray) -> np.ndarray:
        turning = _turning_points(ring, junctions[ring[:, 1], ring[:, 0]])
        if self.tolerance <= 0 or len(ring) < 3:
            return ring[turning]
        pinned = np.flatnonzero(junctions[ring[:, 1], ring[:, 0]])
        if not len(pinned):
            simple = cv2.approxPolyDP(ring[turning].reshape(-1, 1, 2).astype(np.int32), self.tolerance, True)
            simple = simple.reshape(-1, 2)
            return simple if len(simple) >= 3 else ring[turning]
        ring = np.roll(ring, -pinned[0], axis=0)
        turning = np.roll(turning, -pinned[0])
        pinned = np.append(pinned - pinned[0], len(ring))
        pieces = []
        for start, end in zip(pinned[:-1], pinned[1:], strict=True):
            idx = np.arange(start, end + 1) % len(ring)
            keep = turning[idx].copy()
            keep[0] = keep[-1] = True
            pieces.append(self._arc(ring[idx][keep])[:-1])
        simple = np.concatenate(pieces)
        return simple if len(simple) >= 3 else ring[turning]

    def _arc(self, arc: np.ndarray) -> np.ndarray:
        if len(arc) <= 2:
            return arc
        if (arc[0] == arc[-1]).all():  # a loop from one junction back to it: split where both sides agree
            far = max(range(1, len(arc) - 1), key=lambda i: tuple(arc[i]))
            return np.concatenate([self._arc(arc[: far + 1])[:-1], self._arc(arc[far:])])
        flip = tuple(arc[0]) > tuple(arc[-1])
        canonical = arc[::-1] if flip else arc
        simple = cv2.approxPolyDP(canonical.reshape(-1, 1, 2).astype(np.int32), self.tolerance, False)
        simple = simple.reshape(-1, 2)
        return simple[::-1] if flip else simple


def _turning_points(ring: np.ndarray, pinned: np.ndarray) -> np.ndarray:
    """Mask of the points where the outline changes direction, plus pinned (junction) points."""
    before = ring - np.roll(ring, 1, axis=0)
    after = np.roll(ring, -1, axis=0) - ring
    return (before != after).any(axis=1) | pinned
