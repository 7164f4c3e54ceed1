"""Random-weight CLIPs and generated scenes: for tests and benchmarks, which have no pretrained weights.

Not used by the service. `random_clip` builds any open_clip architecture (or a config JSON) with seeded
random weights; `scene` draws a reproducible RGB image.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import open_clip
import torch

ATTENTION_SHARPNESS = 4.0


def random_clip(name: str, seed: int, sharpness: float = ATTENTION_SHARPNESS):
    """(open_clip CLIP with random weights, tokenizer). `name` is a model name or a config JSON path.

    The q and k projections of the image tower are multiplied by `sharpness`: at open_clip's random init
    every attention map is nearly uniform, which makes the CLIP-ES affinity nearly constant and the
    refined maps flat, so their min-max normalisation amplifies float rounding by ~1e4 (real CLIPs attend
    sharply). With sharper random attention the maps carry structure, as with trained weights.
    """
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = Path(name).stem
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            width = block.attn.embed_dim
            block.attn.in_proj_weight[: 2 * width] *= sharpness
    return model, open_clip.get_tokenizer(name)


def scene(seed: int, height: int, width: int, shapes: int = 5) -> np.ndarray:
    """A generated RGB uint8 image: a smooth two-colour gradient, flat rectangles and ellipses, mild noise."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 256, (2, 3))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    for _ in range(shapes):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        ax, ay = int(rng.integers(width // 12, width // 4)), int(rng.integers(height // 12, height // 4))
        if rng.random() < 0.5:
            cv2.rectangle(image, (cx - ax, cy - ay), (cx + ax, cy + ay), colour, -1)
        else:
            cv2.ellipse(image, (cx, cy), (ax, ay), float(rng.integers(0, 180)), 0, 360, colour, -1)
    image += rng.normal(0.0, 4.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
