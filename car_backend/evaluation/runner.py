"""Run CaR over a benchmark's samples, reusing cached predictions, and score the results."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from car_backend.engine.presets import Preset, get_preset
from car_backend.engine.result import Segmentation
from car_backend.evaluation.benchmarks import Benchmark, PaperFigure
from car_backend.evaluation.cache import PredictionCache
from car_backend.evaluation.datasets import ReferringSample, Sample, SemanticSample
from car_backend.evaluation.metrics import ConfusionTally, ReferringTally

log = logging.getLogger(__name__)


class SegmenterLike(Protocol):
    def segment(
        self,
        image: Any,
        queries: list[str],
        preset: str | Preset | None = None,
        mode: str = "semantic",
        background: list[str] | None = None,
    ) -> Segmentation: ...


class EvaluationError(RuntimeError):
    """A sample could not be scored (e.g. the prediction and the label differ in size)."""


@dataclass(frozen=True)
class EvalReport:
    """Scores are fractions (0..1); `metrics` starts with the paper's headline metric, mIoU."""

    benchmark: str
    title: str
    mode: str  # "semantic" | "referring"
    split: str
    preset: str
    images: int  # samples: images, or refs (an image with its sentences) for referring sets
    computed: int  # segmented in this run; the rest came from the cache
    seconds: float  # segmentation time summed over all samples, cached ones included
    metrics: dict[str, float]
    class_iou: dict[str, float]  # semantic only; NaN for classes absent from the targets
    paper: PaperFigure | None
    cache_folder: Path

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def evaluate(
    benchmark: Benchmark,
    samples: Sequence[Sample],
    make_segmenter: Callable[[], SegmenterLike],
    cache: PredictionCache,
    *,
    split: str,
    preset: str,
    progress: bool = True,
) -> EvalReport:
    """Score `samples`; the segmenter is only built if some sample is not cached yet."""
    segmenter: SegmenterLike | None = None
    semantic = benchmark.mode == "semantic"
    tally: ConfusionTally | ReferringTally = ConfusionTally(benchmark.num_classes) if semantic else ReferringTally()
    seconds = 0.0
    computed = 0
    bar = tqdm(samples, desc=f"{benchmark.name} {split}", unit="img", disable=not progress)
    for sample in bar:
        cached = cache.load(sample.key)
        if cached is None:
            if segmenter is None:
                segmenter = make_segmenter()
            image = _load_image(sample.image_path)
            start = time.perf_counter()
            if isinstance(sample, SemanticSample):
                prediction = predict_labels(segmenter, image, benchmark, preset)
            else:
                prediction = predict_mask(segmenter, image, sample, preset)
            elapsed = time.perf_counter() - start
            cache.save(sample.key, prediction, elapsed)
            computed += 1
        else:
            prediction, elapsed = cached.labels, cached.seconds
        seconds += elapsed
        target = sample.load_label() if isinstance(sample, SemanticSample) else sample.load_mask()
        if target.shape != prediction.shape:
            raise EvaluationError(
                f"sample {sample.key}: prediction is {prediction.shape}, label is {target.shape} "
                f"({sample.image_path}); delete {cache.path(sample.key)} if it is stale"
            )
        tally.add(target, prediction)
        bar.set_postfix_str(f"mIoU {100 * tally.scores().miou:.1f}", refresh=False)
    log.info("%s %s: %d samples, %d segmented now, %d from %s",
             benchmark.name, split, len(samples), computed, len(samples) - computed, cache.folder)

    if isinstance(tally, ConfusionTally):
        scores = tally.scores()
        metrics = {"mIoU": scores.miou, "pixel accuracy": scores.pixel_accuracy}
        class_iou = dict(zip(benchmark.labels, scores.class_iou.tolist(), strict=True))
    else:
        ref_scores = tally.scores()
        metrics = {"mIoU": ref_scores.miou, "oIoU": ref_scores.oiou}
        metrics.update({f"P@{t:g}": p for t, p in ref_scores.precision.items()})
        class_iou = {}
    return EvalReport(
        benchmark=benchmark.name,
        title=benchmark.title,
        mode=benchmark.mode,
        split=split,
        preset=preset,
        images=len(samples),
        computed=computed,
        seconds=seconds,
        metrics=metrics,
        class_iou=class_iou,
        paper=benchmark.paper.get(split),
        cache_folder=cache.folder,
    )


def predict_labels(segmenter: SegmenterLike, image: np.ndarray, benchmark: Benchmark, preset: str) -> np.ndarray:
    """Dataset label ids (uint8, 0 = background) from the benchmark's query passes."""
    labels = np.zeros(image.shape[:2], np.uint8)
    for query_pass in benchmark.passes:
        result = segmenter.segment(
            image,
            list(query_pass.queries),
            preset=stuff_preset(preset) if query_pass.stuff else preset,
            mode="semantic",
            background=list(query_pass.background) if query_pass.background is not None else None,
        )
        to_dataset = np.array((0, *query_pass.label_ids), np.uint8)
        painted = to_dataset[result.label_map]
        labels = np.where(painted > 0, painted, labels)
    return labels


def stuff_preset(name: str) -> Preset:
    """The preset with its stuff-pass values; unchanged for presets that have none."""
    preset = get_preset(name)
    if preset.stuff_visual_prompts is None:
        return preset
    return dataclasses.replace(
        preset,
        visual_prompts=preset.stuff_visual_prompts,
        mask_threshold=preset.mask_threshold if preset.stuff_mask_threshold is None else preset.stuff_mask_threshold,
    )


def predict_mask(segmenter: SegmenterLike, image: np.ndarray, sample: ReferringSample, preset: str) -> np.ndarray:
    """The referred object's mask (uint8 0/1) from all of the ref's sentences."""
    result = segmenter.segment(image, list(sample.sentences), preset=preset, mode="referring")
    return (result.label_map > 0).astype(np.uint8)


def _load_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, writable: the engine's dense CRF cannot take the read-only view of a PIL image."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))
