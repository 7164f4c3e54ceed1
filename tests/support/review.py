"""Annotators with a known taste, for the active-learning tests (service integration and end-to-end).

They "correct" each prediction to what CaR gives on the image with a lower keep threshold than the preset's:
calibration must discover that from a few corrected tasks.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from car_backend.engine import Segmenter, get_preset
from car_backend.labelstudio.config import parse_label_config
from car_backend.labelstudio.regions import label_masks
from car_backend.labelstudio.results import segmentation_to_regions
from car_backend.review.agreement import compare
from tests.support.fake_label_studio import image_bytes
from tests.support.settings import tiny_settings

WANTED = {"confidence_threshold": 0.1}  # the annotators' taste, unknown to the backend
IMAGE_SIZE = (64, 96)  # (H, W) of image_bytes' pictures


def review_image(index: int) -> bytes:
    """PNG bytes of the i-th review picture (two flat colour halves)."""
    return image_bytes(f"review-{index}.png")


def annotated_regions(label_config: str, images: list[bytes]) -> list[list[dict]]:
    """What the annotators submit for each image: CaR's output (tiny random CLIP) with the WANTED thresholds."""
    (target,) = parse_label_config(label_config).targets
    segmenter = Segmenter(tiny_settings().engine_config())
    preset = dataclasses.replace(get_preset("coco"), **WANTED)
    out = []
    for data in images:
        image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        seg = segmenter.segment(image, [label.prompt for label in target.labels], preset=preset)
        out.append(segmentation_to_regions(seg, target, list(target.labels), kind="brush"))
    return out


def mean_agreement(predicted: list[list[dict]], annotated: list[list[dict]]) -> float:
    """Mean per-task agreement of prediction results with annotation results (review_image pictures)."""
    scores = [compare(label_masks(p, IMAGE_SIZE), label_masks(a, IMAGE_SIZE)).score
              for p, a in zip(predicted, annotated, strict=True)]
    return float(np.mean(scores))
