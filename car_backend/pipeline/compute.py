"""Computing a job: fetch the image, run the engine, turn its answer into Label Studio regions.

Pure with respect to the service: no Redis, no queue. A worker (car_backend.worker.tasks) and offline
`prelabel --images` call `compute`; calibration calls `segment_run` on prepared images.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np

from car_backend.engine.errors import CarError
from car_backend.engine.presets import get_preset
from car_backend.engine.result import Segmentation
from car_backend.labelstudio.access import Access
from car_backend.labelstudio.media import MediaError, MediaFetcher
from car_backend.labelstudio.results import failed_entry, prediction_entry, segmentation_to_regions
from car_backend.pipeline.spec import JobResult, JobSpec, Run


def failure_conditions(settings: Access) -> str:
    """A digest of the setting values that decide whether fetching an image may fail for a reason other than
    the image itself (allowed hosts, size limits, Label Studio's address and key): a pending failure found
    under other values is not believed. The key enters only as a hash."""
    identity = {
        "allowed_hosts": sorted(h.strip().lower() for h in settings.allowed_hosts),
        "max_download_bytes": settings.max_download_bytes,
        "max_image_pixels": settings.max_image_pixels,
        "label_studio_url": settings.label_studio_url.rstrip("/"),
        "key": hashlib.sha256(settings.label_studio_api_key.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def pending_failure(exc: BaseException, conditions: str, seconds: float = 0.0) -> JobResult:
    """The result recorded when a job's last attempt failed for a reason a setting or an outage may change."""
    return JobResult(ok=False, regions=[], error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, CarError)
                     else str(exc), seconds=seconds, pending=True, conditions=conditions)


def compute(spec: JobSpec, segmenter: Any, fetcher: MediaFetcher, head: Any = None) -> JobResult:
    """Fetch and segment the image (with the project's mask head `head`, an engine.head.MaskHead, if any); a
    non-retryable media failure (a property of the image itself) becomes a failed result, a retryable one (a setting or an outage: host not allowed, size limit, any HTTP
    error status such as a storage's 403/404, timeout) and any other exception raise: the job is retried, and its last attempt records a
    `pending_failure` (worker.tasks.segment)."""
    started = time.monotonic()
    try:
        image = fetcher.fetch(spec.image, spec.task_id)
    except MediaError as exc:
        if exc.retryable:
            raise
        return JobResult(ok=False, regions=[], error=str(exc), seconds=time.monotonic() - started)
    regions: list[dict] = []
    kept_scores: list[float] = []
    margins: list[float] = []
    for run in spec.runs:
        seg = segment_run(segmenter, image, run, dict(spec.thresholds), head)
        kept_scores.extend(float(s) for s in seg.scores if s > 0)
        if seg.margin is not None:
            margins.append(float(seg.margin))
        for out in run.outputs:
            own = seg if run.mode == "referring" else restrict(seg, [label.prompt for label in out.labels])
            if spec.focus is not None:
                own = spec.focus.apply(own)
            regions.extend(segmentation_to_regions(own, out.target, list(out.labels), kind=out.kind,
                                                   polygon_tolerance=spec.polygon_tolerance,
                                                   instances=out.instances))
    return JobResult(ok=True, regions=regions, score=task_score(kept_scores, spec.score, margins),
                     seconds=time.monotonic() - started)


def segment_run(segmenter: Any, image: Any, run: Run, thresholds: dict[str, float], head: Any = None
                ) -> Segmentation:
    """The engine's answer for one run on an image (or a prepared image), `thresholds` overriding its preset,
    with a mask head if one is given (see Segmenter.segment); asked for instances when one of the run's
    outputs wants them (SAM's prompted mode then prompts per connected part)."""
    preset: Any = run.preset
    if thresholds:
        preset = replace(get_preset(run.preset or segmenter.config.preset), **thresholds)
    extra: dict[str, Any] = {"proposals": run.proposals} if run.proposals else {}  # only when a control asked
    if any(out.instances for out in run.outputs):
        extra["instances"] = True
    return segmenter.segment(image, list(run.queries), preset=preset, mode=run.mode,
                             background=list(run.background) if run.background else None, head=head, **extra)


def restrict(seg: Segmentation, prompts: list[str]) -> Segmentation:
    """The part of a union-vocabulary segmentation that concerns `prompts` (a subset of its queries)."""
    if list(prompts) == list(seg.queries):
        return seg
    first = {}
    for i, query in enumerate(seg.queries):
        first.setdefault(query, i)
    picked = [first[p] for p in prompts]
    lut = np.zeros(len(seg.queries) + 1, dtype=np.int32)  # union label i + 1 -> own label j + 1, else 0
    for j, i in reversed(list(enumerate(picked))):
        lut[i + 1] = j + 1
    return replace(seg, queries=list(prompts), label_map=lut[seg.label_map], masks=seg.masks[picked],
                   scores=seg.scores[picked])


def task_score(kept: list[float], mode: str, margins: list[float] = ()) -> float | None:
    """The prediction-level score Label Studio sorts tasks by.

    confidence: the mean kept-label classifier score. uncertainty: 1 - confidence x margin, where margin is
    the CRF's mean per-pixel gap between its two most probable labels: a prediction is likely to be changed
    when the classifier hesitated over which labels are there or the CRF over where their borders run.
    """
    if not kept:
        return None
    confidence = float(np.mean(kept))
    if mode != "uncertainty":
        return round(confidence, 6)
    margin = float(np.mean(margins)) if len(margins) else 1.0
    return round(1.0 - confidence * margin, 6)


def task_entry(results: list[JobResult], version: str) -> dict:
    """One /predict entry from the results of all of a task's jobs (every one finished, none pending)."""
    ok = [r for r in results if r.ok]
    if not ok:
        return failed_entry(version, "; ".join(r.error or "failed" for r in results))
    regions = [region for r in ok for region in r.regions]
    scores = [r.score for r in ok if r.score is not None]
    return prediction_entry(regions, version, score=round(float(np.mean(scores)), 6) if scores else None)
