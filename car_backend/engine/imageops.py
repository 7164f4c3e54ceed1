"""Batched torch versions of the OpenCV / Pillow image operations CaR depends on, matching them bit for bit.

The official code runs these per query on the CPU with cv2 and PIL. Here they run batched on the model's
device. They reproduce the libraries' integer arithmetic exactly, not approximately, because a random or
trained CLIP's scores move by more than 1e-4 with single grey-level differences in the prompted images.
Every intermediate is an integer held exactly (float32 below 2**24, float64 for the resampling), so the
results are the same on CPU and GPU. One exception for speed: on the CPU the bicubic resize calls Pillow
itself, whose SIMD resampler is ~10x faster than the emulation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# cv2.GaussianBlur(img, (15, 15), 0) on uint8 images (sigma = 0.3 * (15 / 2 - 1) + 0.8 = 2.6) uses this
# fixed-point kernel (8 fractional bits, summing to 256): OpenCV's bit-exact path for 8-bit images.
BLUR_KERNEL_15 = (1, 3, 6, 12, 20, 30, 36, 40, 36, 30, 20, 12, 6, 3, 1)

# cv2.COLOR_BGR2GRAY on uint8: Y = (B*3735 + G*19235 + R*9798 + 2**14) >> 15. Applied to an RGB array (the
# official code's quirk) channel 0 (red) takes the blue weight: Y = 0.114 R + 0.587 G + 0.299 B.
GRAY_QUIRK_WEIGHTS = (3735, 19235, 9798)

# Pillow's fixed-point precision for 8-bit resampling.
_PIL_PRECISION_BITS = 22


def reflect101_index(size: int, pad: int) -> np.ndarray:
    """Source indices of a length-`size` axis padded by `pad` on both sides with cv2.BORDER_REFLECT_101."""
    index = np.arange(-pad, size + pad)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def gaussian_blur_15(images: torch.Tensor) -> torch.Tensor:
    """cv2.GaussianBlur(image, (15, 15), 0) for uint8 images (C, H, W); returns uint8."""
    channels, height, width = images.shape
    pad = len(BLUR_KERNEL_15) // 2
    rows = torch.as_tensor(reflect101_index(height, pad), device=images.device)
    cols = torch.as_tensor(reflect101_index(width, pad), device=images.device)
    padded = images.float()[:, rows][:, :, cols][None]
    kernel = torch.tensor(BLUR_KERNEL_15, dtype=torch.float32, device=images.device)
    # Exact in float32 (integer partial sums < 2**24) unless TF32 rounds the second pass's inputs.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        x = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return torch.floor((x[0] + 2 ** 15) / 2 ** 16).to(torch.uint8)


def gray_quirk(images: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(rgb_array, cv2.COLOR_BGR2GRAY) for uint8 (..., 3, H, W), replicated to 3 channels."""
    x = images.float()
    weighted = sum(x[..., c, :, :] * w for c, w in enumerate(GRAY_QUIRK_WEIGHTS))
    gray = torch.floor((weighted + 2 ** 14) / 2 ** 15).to(torch.uint8)
    return gray.unsqueeze(-3).expand_as(images)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic filter (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's bicubic resampling matrix for one axis, (out_size, in_size), in fixed point (2**22 = 1).

    Same arithmetic as Pillow's precompute_coeffs + normalize_coeffs_8bpc: double precision, then rounded
    half away from zero.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        k = _bicubic((np.arange(count) + xmin - center + 0.5) * (1.0 / filter_scale))
        total = 0.0
        for value in k:  # sequential, as Pillow sums (numpy's pairwise sum can round differently)
            total += value
        if total != 0.0:
            k = k / total
        fixed = k * (1 << _PIL_PRECISION_BITS)
        weights[xx, xmin:xmin + count] = np.where(fixed < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5))
    return weights


def _resample(images: torch.Tensor, weights: np.ndarray, dim: int) -> torch.Tensor:
    """One Pillow 8-bit resampling pass along `dim` (-1 or -2), rounded and clipped like Pillow's clip8.

    A dense float64 product: inputs are integers <= 255 and weights integers < 2**23, so every partial sum
    is an exact integer.
    """
    matrix = torch.as_tensor(weights, device=images.device)
    x = images.to(torch.float64)
    acc = x @ matrix.T if dim == -1 else matrix @ x
    return torch.floor((acc + (1 << (_PIL_PRECISION_BITS - 1))) / (1 << _PIL_PRECISION_BITS)).clamp_(0, 255)


def pil_bicubic_resize(
    images: torch.Tensor, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """PIL `Image.resize((w, h), BICUBIC)` of uint8 (..., C, H, W) images to `size` = (h, w); returns uint8.

    `crop` = (top, left, height, width) returns only that window of the resized image (what a following
    center crop keeps). On the CPU this is Pillow itself (its SIMD resampler is ~10x faster than the
    emulation); elsewhere `emulate_pil_bicubic_resize`, which matches it bit for bit.
    """
    if images.device.type != "cpu":
        return emulate_pil_bicubic_resize(images, size, crop)
    out_h, out_w = size
    top, left, crop_h, crop_w = crop if crop is not None else (0, 0, out_h, out_w)
    flat = images.reshape(-1, *images.shape[-3:]).permute(0, 2, 3, 1).contiguous().numpy()
    resized = [
        np.asarray(Image.fromarray(a).resize((out_w, out_h), Image.BICUBIC))[top:top + crop_h, left:left + crop_w]
        for a in flat
    ]
    out = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)
    return out.reshape(*images.shape[:-2], crop_h, crop_w)


def emulate_pil_bicubic_resize(
    images: torch.Tensor, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """`pil_bicubic_resize` in torch: horizontal pass first, each pass rounded and clipped to 8 bits, as
    Pillow does; a pass whose size does not change is skipped, as Pillow does; only the crop is computed.
    """
    in_h, in_w = images.shape[-2:]
    out_h, out_w = size
    top, left, crop_h, crop_w = crop if crop is not None else (0, 0, out_h, out_w)
    x = images
    if out_w != in_w:
        x = _resample(x, pil_bicubic_weights(in_w, out_w)[left:left + crop_w], dim=-1)
    else:
        x = x[..., left:left + crop_w]
    if out_h != in_h:
        x = _resample(x, pil_bicubic_weights(in_h, out_h)[top:top + crop_h], dim=-2)
    else:
        x = x[..., top:top + crop_h, :]
    return x.to(torch.uint8)


def shorter_side_resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) on PIL images (CLIP's preprocessing), uint8."""
    height, width = images.shape[-2:]
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return pil_bicubic_resize(images, (new_h, new_w), crop=(top, left, size, size))


def _cv2_linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR source indices and float32 weights for one axis."""
    scale = 1.0 / (out_size / in_size)
    position = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(position).astype(np.int64)
    frac = (position - start).astype(np.float32)
    low = start < 0
    high = start >= in_size - 1
    frac[low | high] = 0.0
    start[low] = 0
    start[high] = in_size - 1
    return start, np.minimum(start + 1, in_size - 1), frac


def cv2_linear_resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv2.resize(map, (w, h), interpolation=INTER_LINEAR) for float32 maps (..., H, W); `size` = (h, w).

    OpenCV's reference algorithm (same taps and float32 weights, horizontal pass first); OpenCV's own
    optimised build rounds differently, by up to ~2e-6 on [0, 1] maps.
    """
    in_h, in_w = maps.shape[-2:]
    out_h, out_w = size
    device = maps.device
    x0, x1, fx = (torch.as_tensor(a, device=device) for a in _cv2_linear_taps(in_w, out_w))
    y0, y1, fy = (torch.as_tensor(a, device=device) for a in _cv2_linear_taps(in_h, out_h))
    rows = maps[..., x0] * (1.0 - fx) + maps[..., x1] * fx
    fy = fy.unsqueeze(-1)
    return rows[..., y0, :] * (1.0 - fy) + rows[..., y1, :] * fy
