"""Visual prompts and the image operations behind them, against OpenCV and Pillow."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from car_backend.engine import imageops
from car_backend.engine.visual_prompts import apply_prompts, draw_outlines, fill_holes, prompt_background


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size", [(375, 500), (17, 301), (5, 7), (1, 9)])
def test_blur_equals_cv2_gaussian_blur_15(size):
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    assert np.array_equal(hwc(imageops.gaussian_blur_15(chw(image))), cv2.GaussianBlur(image, (15, 15), 0))


def test_gray_uses_the_bgr_weights_on_rgb_arrays():
    pure = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)  # red, green, blue (RGB)
    gray = hwc(imageops.gray_quirk(chw(pure)))
    assert gray[0, :, 0].tolist() == [29, 150, 76]  # 0.114 * 255, 0.587 * 255, 0.299 * 255
    assert (gray == gray[..., :1]).all()
    image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert np.array_equal(hwc(imageops.gray_quirk(chw(image)))[..., 0], cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))


@pytest.mark.parametrize(("source", "target"), [((375, 500), (224, 298)), ((500, 375), (298, 224)),
                                                 ((120, 90), (384, 288)), ((37, 301), (48, 304))])
def test_bicubic_resize_emulation_equals_pillow(source, target):
    image = np.random.default_rng(source[0]).integers(0, 256, (*source, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize(target[::-1], Image.BICUBIC))
    emulated = imageops.emulate_pil_bicubic_resize(chw(image)[None], target)[0]
    assert np.array_equal(hwc(emulated), expected)
    assert np.array_equal(hwc(imageops.pil_bicubic_resize(chw(image)[None], target)[0]), expected)


@pytest.mark.parametrize("size", [(375, 500), (500, 375), (224, 224), (100, 300)])
def test_shorter_side_resize_and_centre_crop_equal_clip_preprocessing(size):
    image = np.random.default_rng(size[1]).integers(0, 256, (*size, 3), dtype=np.uint8)
    height, width = size
    new_w, new_h = (224, int(224 * height / width)) if width <= height else (int(224 * width / height), 224)
    top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    expected = resized[top:top + 224, left:left + 224]
    batch = chw(image)[None].repeat(2, 1, 1, 1)
    assert np.array_equal(hwc(imageops.shorter_side_resize_crop(batch, 224)[1]), expected)
    crop = (top, left, 224, 224)
    assert np.array_equal(hwc(imageops.emulate_pil_bicubic_resize(batch, (new_h, new_w), crop)[0]), expected)


def test_linear_resize_matches_cv2():
    maps = np.random.default_rng(0).random((3, 24, 32)).astype(np.float32)
    ours = imageops.cv2_linear_resize(torch.from_numpy(maps), (375, 500)).numpy()
    for ours_map, source in zip(ours, maps, strict=True):
        assert np.abs(ours_map - cv2.resize(source, (500, 375))).max() < 5e-6


def test_ellipse_is_centred_on_the_centroid_with_half_box_axes():
    mask = np.zeros((80, 100), dtype=bool)
    mask[20:40, 30:70] = True  # centroid (x 49.5 -> 49, y 29.5 -> 29), box 40 x 20
    outline = draw_outlines(torch.from_numpy(mask)[None], ("circle",))[0].numpy()
    expected = np.zeros((80, 100), dtype=np.uint8)
    cv2.ellipse(expected, (49, 29), (20, 10), 0, 0, 360, 255, 1)
    assert np.array_equal(outline, expected > 0)
    for y, x in [(29, 29), (29, 69), (19, 49), (39, 49)]:  # extreme points of the ellipse
        assert outline[y, x]
    assert not outline[29, 49]


def test_rectangle_and_contour_outlines():
    mask = np.zeros((60, 60), dtype=bool)
    mask[10:30, 20:50] = True
    mask[15:20, 30:35] = False  # a hole: the contour prompt fills it first
    outlines = draw_outlines(torch.from_numpy(np.stack([mask, mask])), ("rectangle", "contour"))[0].numpy()
    ys, xs = np.nonzero(mask)
    cx, cy = int(xs.mean()), int(ys.mean())
    expected = np.zeros((60, 60), dtype=np.uint8)
    cv2.rectangle(expected, (cx - 15, cy - 10), (cx + 15, cy + 10), 255, 1)
    filled = mask.copy()
    filled[15:20, 30:35] = True
    contours, _ = cv2.findContours(filled.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(expected, contours, -1, 255, 1)
    assert np.array_equal(outlines, expected > 0)
    assert draw_outlines(torch.from_numpy(mask)[None], ("blur", "gray")) is None


def test_fill_holes_fills_enclosed_background_only():
    mask = np.zeros((9, 9), dtype=np.uint8)
    cv2.rectangle(mask, (1, 1), (6, 6), 1, 1)  # closed ring: its inside is a hole
    mask[0, 8] = 1
    filled = fill_holes(mask)
    assert filled[2:6, 2:6].all() and filled[1:7, 1:7].all()
    assert not filled[7:, :].any() and filled[0, 8] == 1 and filled[0, 0] == 0


def test_prompt_background_and_composition():
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pixels = chw(image)
    blurred = cv2.GaussianBlur(image, (15, 15), 0)
    both = hwc(prompt_background(pixels, ("gray", "blur")))
    assert np.array_equal(both[..., 0], cv2.cvtColor(blurred, cv2.COLOR_BGR2GRAY))  # blur first, then gray
    assert not prompt_background(pixels, ("black", "blur")).any()
    assert prompt_background(pixels, ("circle",)) is None
    mask = np.zeros((40, 50), dtype=bool)
    mask[10:30, 10:30] = True
    masks = torch.from_numpy(mask)[None]
    outline = draw_outlines(masks, ("circle",))
    prompted = hwc(apply_prompts(pixels, masks, torch.from_numpy(blurred).permute(2, 0, 1), outline)[0])
    on_outline = outline[0].numpy()
    assert (prompted[on_outline] == [255, 0, 0]).all()
    inside, outside = mask & ~on_outline, ~mask & ~on_outline
    assert np.array_equal(prompted[inside], image[inside])
    assert np.array_equal(prompted[outside], blurred[outside])
