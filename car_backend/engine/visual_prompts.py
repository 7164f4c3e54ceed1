"""Visual prompts: mark one mask on the image so that CLIP looks at it (spec section 3).

The official code draws each prompt per query on the CPU, always in the order blur, gray, black, circle,
rectangle, contour. Blur, gray and black only change the pixels *outside* the mask, and each is a
per-pixel function of the image alone, so their combined effect is one "background" image computed once
per image; each query's prompted image is then `where(mask, image, background)`. The outlines (1 px, red)
are drawn with cv2 into per-query masks (cheap at full resolution) and painted on the device.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from car_backend.engine.imageops import gaussian_blur_15, gray_quirk

BACKGROUND_PROMPTS = ("blur", "gray", "black")
OUTLINE_PROMPTS = ("circle", "rectangle", "contour")
VISUAL_PROMPTS = BACKGROUND_PROMPTS + OUTLINE_PROMPTS
OUTLINE_COLOUR = (255, 0, 0)


def prompt_background(pixels: torch.Tensor, prompts: tuple[str, ...]) -> torch.Tensor | None:
    """What the pixels outside a mask become, for uint8 (3, H, W) `pixels`; None if they stay as they are."""
    if "black" in prompts:
        return torch.zeros_like(pixels)
    background = None
    if "blur" in prompts:
        background = gaussian_blur_15(pixels)
    if "gray" in prompts:
        background = gray_quirk(pixels if background is None else background)
    return background


def draw_outlines(masks: torch.Tensor, prompts: tuple[str, ...]) -> torch.Tensor | None:
    """Per-mask 1 px outlines (Q, H, W) bool for the circle / rectangle / contour prompts; None if none.

    Circle: ellipse centred on the mask's centroid (truncated to int) with semi-axes half the bounding
    box's width and height; rectangle: the same extent; contour: the outline of the hole-filled mask.
    """
    wanted = [p for p in OUTLINE_PROMPTS if p in prompts]
    if not wanted:
        return None
    count, height, width = masks.shape
    boxes = _centre_and_extent(masks) if ("circle" in wanted or "rectangle" in wanted) else None
    cpu_masks = masks.cpu().numpy() if "contour" in wanted else None
    canvases = np.zeros((count, height, width), dtype=np.uint8)
    for i in range(count):
        if boxes is not None:
            cx, cy, box_w, box_h = boxes[i]
            if "circle" in wanted:
                cv2.ellipse(canvases[i], (cx, cy), (box_w // 2, box_h // 2), 0, 0, 360, 255, 1)
            if "rectangle" in wanted:
                start = (cx - box_w // 2, cy - box_h // 2)
                end = (cx + box_w // 2, cy + box_h // 2)
                cv2.rectangle(canvases[i], start, end, 255, 1)
        if cpu_masks is not None:
            filled = fill_holes(cpu_masks[i])
            contours, _ = cv2.findContours(filled, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvases[i], contours, -1, 255, 1)
    return torch.as_tensor(canvases, device=masks.device) > 0


def _centre_and_extent(masks: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(centroid x, centroid y, box width, box height) per non-empty mask, computed on the device."""
    height, width = masks.shape[-2:]
    ys = torch.arange(height, device=masks.device, dtype=torch.float64)
    xs = torch.arange(width, device=masks.device, dtype=torch.float64)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    count = masks.sum(dim=(1, 2)).double()
    cy = (masks.sum(dim=2).double() @ ys) / count
    cx = (masks.sum(dim=1).double() @ xs) / count
    y_min = rows.double().argmax(dim=1)
    y_max = height - 1 - rows.flip(1).double().argmax(dim=1)
    x_min = cols.double().argmax(dim=1)
    x_max = width - 1 - cols.flip(1).double().argmax(dim=1)
    stats = torch.stack([cx.floor(), cy.floor(), (x_max - x_min + 1).double(), (y_max - y_min + 1).double()], 1)
    return [tuple(int(v) for v in row) for row in stats.cpu().tolist()]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """uint8 mask with its holes filled: background not 4-connected to the border becomes foreground."""
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask > 0
    flood_mask = np.zeros((height + 4, width + 4), dtype=np.uint8)
    outside = padded.copy()
    cv2.floodFill(outside, flood_mask, (0, 0), 2, flags=4)
    return (outside[1:-1, 1:-1] != 2).astype(np.uint8)


def apply_prompts(
    pixels: torch.Tensor, masks: torch.Tensor, background: torch.Tensor | None, outlines: torch.Tensor | None
) -> torch.Tensor:
    """Prompted images (Q, 3, H, W) uint8: background outside each mask, then red outlines on top."""
    images = pixels.expand(len(masks), -1, -1, -1)
    if background is not None:
        images = torch.where(masks[:, None], images, background)
    if outlines is not None:
        colour = torch.tensor(OUTLINE_COLOUR, dtype=torch.uint8, device=pixels.device).view(1, 3, 1, 1)
        images = torch.where(outlines[:, None], colour, images)
    return images
