"""`car-backend segment IMAGE --labels "a,b" [--preset] [--referring] [--out] [--overlay] [--json]`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from car_backend.engine.config import EngineConfig
from car_backend.engine.models import ModelLoadError, ModelSpecError
from car_backend.engine.result import Segmentation
from car_backend.engine.segmenter import Segmenter

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.5


def segment_command(args: argparse.Namespace, config: EngineConfig) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        log.error("--labels is empty; give a comma-separated vocabulary")
        return 2
    try:
        with Image.open(args.image) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        log.error("cannot read image %s: %s", args.image, exc)
        return 2
    mode = "referring" if args.referring else "semantic"
    try:
        result = Segmenter(config).segment(image, labels, preset=args.preset, mode=mode)
    except (ModelLoadError, ModelSpecError) as exc:
        log.error("%s", exc)
        return 2
    if args.out:
        write_label_map(result.label_map, Path(args.out))
    if args.overlay:
        write_overlay(np.asarray(image), result, Path(args.overlay))
    if args.json:
        print(json.dumps(summary(result, args.image, args.preset or config.preset)))
    else:
        print(table(result))
    return 0


def summary(result: Segmentation, image: str, preset: str) -> dict:
    """The --json object: kept labels with their scores, steps, stage timings, image size."""
    return {
        "image": str(image),
        "size": list(result.size),
        "mode": result.mode,
        "preset": preset,
        "labels": result.kept,
        "scores": {q: round(float(s), 6) for q, s in zip(result.queries, result.scores, strict=True) if s > 0},
        "steps": result.steps,
        "timings": {stage: round(seconds, 4) for stage, seconds in result.timings.items()},
    }


def table(result: Segmentation) -> str:
    width = max(len(q) for q in result.queries)
    lines = [f"{'label':<{width}}  score   pixels"]
    for index, (query, score) in enumerate(zip(result.queries, result.scores, strict=True)):
        pixels = int((result.label_map == index + 1).sum()) if result.mode == "semantic" else int(result.masks[index].sum())
        lines.append(f"{query:<{width}}  {score:5.3f}  {pixels:>7}" + ("" if score > 0 else "  (dropped)"))
    timings = ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in result.timings.items())
    lines.append(f"steps: {result.steps}; {timings}")
    return "\n".join(lines)


def write_label_map(label_map: np.ndarray, path: Path) -> None:
    """PNG with pixel value = label index + 1 (0 = background); 16-bit when there are more than 255 labels."""
    if label_map.max() <= 255:
        Image.fromarray(label_map.astype(np.uint8)).save(path)
    else:
        Image.fromarray(label_map.astype(np.uint16)).save(path)


def write_overlay(rgb: np.ndarray, result: Segmentation, path: Path) -> None:
    """The masks blended over the image in one colour per label."""
    palette = _palette(len(result.queries) + 1)
    colours = palette[result.label_map]
    painted = result.label_map > 0
    blended = rgb.astype(np.float32)
    blended[painted] = (1 - OVERLAY_ALPHA) * blended[painted] + OVERLAY_ALPHA * colours[painted]
    Image.fromarray(blended.round().astype(np.uint8)).save(path)


def _palette(count: int) -> np.ndarray:
    """Distinct colours: golden-ratio hues at full saturation (index 0 unused: background)."""
    hues = (np.arange(count) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 180, np.full(count, 200), np.full(count, 255)], axis=1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32)
