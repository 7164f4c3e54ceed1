"""Object instances: a label's mask split into the objects it covers.

`split_instances` turns a semantic label map into `Instances` (an instance map plus one label and score per
instance): each 8-connected part of a label is one instance, after parts smaller than `min_area` pixels are
given to their neighbours (`absorb_specks`, the same rule the polygon tracing uses). Prediction regions,
boxes and exports read instances from here, so they agree on what one object is.

With Segment Anything the engine also knows which object each pixel belongs to (`Parts`, painted by
`paint_parts`): then a label's instances are the objects found for it, whether or not they touch, and only
the label's pixels that no object holds fall back to connected parts.

Instance score: the label's classifier score times a mask-quality term, SAM's predicted IoU of the object's
mask where SAM made it, else 1 (so without SAM an instance has its label's score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MIN_AREA_PX = 4  # connected parts smaller than this (in pixels) go to their neighbours
# An object mask with at least this share of its pixels inside a larger object of the same label is a piece of
# that object (SAM's automatic masks come at whole, part and sub-part levels), not another instance.
NESTED = 0.9


@dataclass(frozen=True, eq=False)
class Parts:
    """Which object each pixel belongs to, whatever its label (Segment Anything's masks, `paint_parts`).

    `map`: (H, W) int32, 0 where no object, p + 1 on object p's pixels; `quality`: (P,) the mask-quality
    term of each object (SAM's predicted IoU; 1.0 when unknown).
    """

    map: np.ndarray
    quality: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class Instances:
    """The object instances of one image.

    `instance_map`: (H, W) int32, 0 where no instance, j + 1 on instance j's pixels (instances never
    overlap); `labels`: (N,) the label map value of each instance (i + 1 = query i); `scores`: (N,) float, the
    instance's score.
    """

    instance_map: np.ndarray
    labels: tuple[int, ...]
    scores: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def mask(self, j: int) -> np.ndarray:
        """(H, W) bool: instance j's pixels."""
        return self.instance_map == j + 1

    def of_label(self, value: int) -> list[int]:
        """Indices of the instances whose label map value is `value`."""
        return [j for j, label in enumerate(self.labels) if label == value]

    def box(self, j: int) -> tuple[int, int, int, int]:
        """Instance j's pixel bounds (x0, y0, x1, y1), x1/y1 exclusive; (0, 0, 0, 0) when it has no pixels."""
        return bounds(self.mask(j))


def bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The pixel bounds (x0, y0, x1, y1) of an (H, W) mask, x1/y1 exclusive; (0, 0, 0, 0) when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return 0, 0, 0, 0
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def split_instances(label_map: np.ndarray, scores: Sequence[float], classes: Sequence[int] | None = None,
                    min_area: int = MIN_AREA_PX, parts: Parts | None = None) -> Instances:
    """Instances of a semantic label map.

    `label_map`: (H, W) int, 0 background, i + 1 = query i; `scores`: (Q,) the score of each query;
    `classes`: the label map values to split (default: every non-zero value present); `parts`: the
    engine's objects at the label map's size (None: connected parts only). Without parts each connected part
    is an instance with its label's score. With parts each object holding at least `min_area` of the label's
    pixels is an instance (score: the label's times the object's quality); the label's other pixels join the
    nearest such object of their connected part, or, in a connected part without one, make an instance of
    their own (quality 1). Instances are numbered by label, then in raster order of their first pixel.
    """
    label_map = np.asarray(label_map, dtype=np.int32)
    if classes is None:
        classes = [int(v) for v in np.unique(label_map) if v > 0]
    label_map = absorb_specks(label_map, classes, min_area)
    instance_map = np.zeros(label_map.shape, dtype=np.int32)
    labels: list[int] = []
    instance_scores: list[float] = []
    for value in classes:
        mask = label_map == value
        if parts is None:
            count, pieces = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            quality = [1.0] * (count - 1)
        else:
            pieces, quality = _object_pieces(mask, parts, min_area)
        inside = pieces > 0
        instance_map[inside] = pieces[inside] + len(labels)
        labels.extend([int(value)] * len(quality))
        instance_scores.extend(float(scores[value - 1]) * q for q in quality)
    return Instances(instance_map, tuple(labels), tuple(instance_scores))


def _object_pieces(mask: np.ndarray, parts: Parts, min_area: int) -> tuple[np.ndarray, list[float]]:
    """(H, W) int32 numbering one label's instances 1..n (raster order of first pixel) and their qualities,
    from the label's pixels `mask` and the engine's objects (see split_instances)."""
    ids = np.where(mask, parts.map, 0)
    found, counts = np.unique(ids[mask], return_counts=True)
    objects = found[(found > 0) & (counts >= max(min_area, 1))]
    assigned = np.isin(ids, objects)
    ids[~assigned] = 0
    quality = {int(p): float(parts.quality[p - 1]) for p in objects}
    loose = mask & ~assigned
    if loose.any():
        count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        next_key = len(parts.quality) + 1
        for c in np.unique(components[loose]):
            x, y, w, h = stats[c, :4]
            window = (slice(y, y + h), slice(x, x + w))
            component = components[window] == c
            seeds = component & assigned[window]
            if not seeds.any():  # no object here: the connected part is an instance of its own
                ids[window][component] = next_key
                quality[next_key] = 1.0
                next_key += 1
                continue
            # each loose pixel joins the object of its nearest seed (DIST_LABEL_PIXEL numbers the seeds
            # 1, 2, ... in raster order)
            _, nearest = cv2.distanceTransformWithLabels((~seeds).astype(np.uint8), cv2.DIST_L2, 5,
                                                         labelType=cv2.DIST_LABEL_PIXEL)
            seed_ids = ids[window][seeds]
            fill = component & ~seeds
            ids[window][fill] = seed_ids[nearest[fill] - 1]
    flat = ids.ravel()
    keys, first = np.unique(flat, return_index=True)
    order = [int(k) for k, _ in sorted(zip(keys, first, strict=True), key=lambda kf: kf[1]) if k > 0]
    lut = np.zeros(int(keys.max()) + 1 if len(keys) else 1, dtype=np.int32)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[ids], [quality[k] for k in order]


def paint_parts(masks: np.ndarray, scores: np.ndarray, objects: Sequence[Sequence[tuple[np.ndarray, float]] | None]
                ) -> Parts:
    """The engine's objects as `Parts`, for label masks (K, H, W) with scores (K,) where `objects[k]` lists
    label k's object masks ((H, W) bool) with their quality (None: SAM found none for it).

    Labels are painted in the order `postprocess.assemble_label_map` paints them (ascending score, stable,
    score 0 skipped), each first clearing its own mask, so that a pixel's object is always one found for the
    label that wins the pixel; qualities are clipped to [0, 1]; within a label the better masks are painted
    last, and an object mostly (`NESTED`) inside a larger one of the same label is left out (it is a piece of
    that object).
    """
    part_map = np.zeros(masks.shape[1:], dtype=np.int32)
    quality: list[float] = []
    for k in np.argsort(scores, kind="stable"):
        if scores[k] <= 0:
            continue
        part_map[masks[k]] = 0
        for mask, q in sorted(_distinct(objects[k] or ()), key=lambda mq: mq[1]):
            quality.append(float(np.clip(q, 0.0, 1.0)))  # SAM's IoU head can answer slightly above 1
            part_map[mask & masks[k]] = len(quality)
    return Parts(part_map, tuple(quality))


def _distinct(objects: Sequence[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, float]]:
    """The objects not mostly inside a larger one (largest first)."""
    kept: list[tuple[np.ndarray, float]] = []
    for mask, q in sorted(objects, key=lambda mq: -int(mq[0].sum())):
        area = int(mask.sum())
        if area and not any((mask & other).sum() >= NESTED * area for other, _ in kept):
            kept.append((mask, q))
    return kept


def absorb_specks(label_map: np.ndarray, classes: Sequence[int], min_area: int = MIN_AREA_PX) -> np.ndarray:
    """`label_map` where connected parts of `classes` smaller than `min_area` pixels take the label of the
    nearest pixel outside them; (H, W) int32 in and out (the input itself when nothing changes)."""
    if min_area <= 1:
        return label_map
    specks = np.zeros(label_map.shape, dtype=np.uint8)
    for k in classes:
        n, parts, stats, _ = cv2.connectedComponentsWithStats(
            (label_map == k).astype(np.uint8), connectivity=8
        )
        small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < min_area) + 1
        if len(small):
            specks[np.isin(parts, small)] = 1
    if not specks.any() or specks.all():
        return label_map
    # every speck pixel takes the label of its nearest non-speck pixel;
    # DIST_LABEL_PIXEL numbers the zero (non-speck) pixels 1, 2, ... in raster order
    _, nearest = cv2.distanceTransformWithLabels(specks, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    keep = np.flatnonzero(specks.ravel() == 0)
    flat = label_map.ravel().copy()
    where = np.flatnonzero(specks.ravel())
    flat[where] = flat[keep[nearest.ravel()[where] - 1]]
    return flat.reshape(label_map.shape)
