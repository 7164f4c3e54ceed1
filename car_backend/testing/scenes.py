"""Generated scenes with known masks: several classes of shapes, each with its own colour and texture.

For the fit tests and benchmarks/fit.py: `labelled_scene` draws 1-3 objects of a vocabulary of classes on a
gradient background and returns their masks, which stand in for annotators' corrections.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

TEXTURES = ("flat", "stripes", "checks", "dots")


@dataclass(frozen=True)
class SceneClass:
    """A class of object: its label, base colour (RGB uint8), texture (one of TEXTURES) and shape."""

    name: str
    colour: tuple[int, int, int]
    texture: str
    shape: str  # "rectangle" | "ellipse"


@dataclass(frozen=True)
class LabelledScene:
    image: np.ndarray  # (H, W, 3) uint8
    masks: dict[str, np.ndarray]  # label -> bool (H, W), only the labels present (non-empty masks)


def labelled_scene(seed: int, classes: tuple[SceneClass, ...], size: tuple[int, int] = (64, 64),
                   most: int = 3) -> LabelledScene:
    """A reproducible scene with 1..`most` distinct classes; later objects cover earlier ones (masks say so)."""
    rng = np.random.default_rng(seed)
    height, width = size
    top, bottom = rng.integers(90, 170, (2, 3))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    count = int(rng.integers(1, min(most, len(classes)) + 1))
    chosen = rng.choice(len(classes), size=count, replace=False)
    label_map = np.full((height, width), -1, dtype=np.int32)
    for index in chosen:
        cls = classes[int(index)]
        region = np.zeros((height, width), dtype=np.uint8)
        cx, cy = int(rng.integers(width // 5, width - width // 5)), int(rng.integers(height // 5, height - height // 5))
        ax, ay = int(rng.integers(width // 8, width // 4)), int(rng.integers(height // 8, height // 4))
        if cls.shape == "rectangle":
            cv2.rectangle(region, (cx - ax, cy - ay), (cx + ax, cy + ay), 1, -1)
        else:
            cv2.ellipse(region, (cx, cy), (ax, ay), float(rng.integers(0, 180)), 0, 360, 1, -1)
        inside = region > 0
        image[inside] = _texture(cls, height, width)[inside]
        label_map[inside] = int(index)
    image += rng.normal(0.0, 3.0, image.shape)
    masks = {classes[i].name: label_map == i for i in range(len(classes)) if np.any(label_map == i)}
    return LabelledScene(np.clip(image, 0, 255).astype(np.uint8), masks)


def _texture(cls: SceneClass, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float: the class colour, darkened on its texture's pattern."""
    rows, cols = np.mgrid[:height, :width]
    pattern = {
        "flat": np.zeros((height, width), bool),
        "stripes": (cols // 3) % 2 == 0,
        "checks": ((rows // 4) + (cols // 4)) % 2 == 0,
        "dots": ((rows % 6) < 2) & ((cols % 6) < 2),
    }[cls.texture]
    colour = np.asarray(cls.colour, dtype=float)
    return np.where(pattern[..., None], colour * 0.6, colour)[..., :] * np.ones((height, width, 1))
