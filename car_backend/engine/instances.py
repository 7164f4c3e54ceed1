"""Object instances: a label's mask split into the objects it covers.

`split_instances` turns a semantic label map into `Instances` (an instance map plus one label and score per
instance): each 8-connected part of a label is one instance, after parts smaller than `min_area` pixels are
given to their neighbours (`absorb_specks`, the same rule the polygon tracing uses). Prediction regions,
boxes and exports read instances from here, so they agree on what one object is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MIN_AREA_PX = 4  # connected parts smaller than this (in pixels) go to their neighbours


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
        mask = self.mask(j)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            return 0, 0, 0, 0
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def split_instances(label_map: np.ndarray, scores: Sequence[float], classes: Sequence[int] | None = None,
                    min_area: int = MIN_AREA_PX) -> Instances:
    """Instances of a semantic label map.

    `label_map`: (H, W) int, 0 background, i + 1 = query i; `scores`: (Q,) the score of each query, given
    to each of its instances; `classes`: the label map values to split (default: every non-zero value
    present). Instances are numbered by label, then in raster order of their first pixel.
    """
    label_map = np.asarray(label_map, dtype=np.int32)
    if classes is None:
        classes = [int(v) for v in np.unique(label_map) if v > 0]
    label_map = absorb_specks(label_map, classes, min_area)
    instance_map = np.zeros(label_map.shape, dtype=np.int32)
    labels: list[int] = []
    instance_scores: list[float] = []
    for value in classes:
        count, parts = cv2.connectedComponents((label_map == value).astype(np.uint8), connectivity=8)
        inside = parts > 0
        instance_map[inside] = parts[inside] + len(labels)
        labels.extend([int(value)] * (count - 1))
        instance_scores.extend([float(scores[value - 1])] * (count - 1))
    return Instances(instance_map, tuple(labels), tuple(instance_scores))


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
