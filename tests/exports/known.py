"""Label maps with known shapes for writer tests: parts, a hole, the image border, an absent label."""

from __future__ import annotations

import numpy as np

from car_backend.exports.records import ExportItem

LABELS = ("cat", "dog", "sofa")  # sofa never appears


def ring_scene(height: int = 40, width: int = 56) -> np.ndarray:
    """cat: a ring with a dog-filled hole and a second part on the border; dog: the hole and a block."""
    label_map = np.zeros((height, width), np.int32)
    label_map[5:25, 5:25] = 1
    label_map[10:20, 10:20] = 2  # dog inside cat's hole
    label_map[30:, 40:] = 1  # a part touching the bottom-right corner
    label_map[2:8, 35:50] = 2
    return label_map


def stripes_scene(height: int = 30, width: int = 20) -> np.ndarray:
    label_map = np.zeros((height, width), np.int32)
    label_map[:, :7] = 2
    label_map[12:18, 9:] = 1
    return label_map


def known_items() -> list[ExportItem]:
    return [
        ExportItem("b/ring.png", "/data/ring.png", ring_scene(), {"cat": 0.9, "dog": 0.4}, 0.65, 0.3),
        ExportItem("a-stripes.jpg", "/data/a-stripes.jpg", stripes_scene(), {"cat": 0.7, "dog": 0.8}, 0.75, 0.6),
        ExportItem("empty.png", "/data/empty.png", np.zeros((12, 16), np.int32), {}, None, 1.0),
    ]
