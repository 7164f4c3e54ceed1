"""Reviewing one submitted annotation: compare it with what this backend delivered, keep it as a correction.

`review_annotation` (the job /webhook queues for ANNOTATION_CREATED/UPDATED) reads the annotation back from
Label Studio (review.webhook.read_back) and compares it with the prediction delivered for the task (the
delivery ledger's mark): IoU per label, labels missed, labels added wrongly. It keeps the annotation's masks
as the task's correction (with the time of this review: training and calibration take the most recent), and
queues a calibration once a project has CAR_CALIBRATE_AFTER more corrected tasks than it had when the last
one ran, and a mask-head training after CAR_FIT_AFTER more than the last training.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from car_backend.labelstudio.client import LabelStudioAPIError
from car_backend.labelstudio.regions import RegionSizeError, label_masks, shrink
from car_backend.queue.stats import CounterFamily
from car_backend.review.agreement import compare
from car_backend.review.runtime import ReviewRuntime
from car_backend.review.store import Correction
from car_backend.review.triggers import queue_calibration, queue_fit
from car_backend.review.webhook import AnnotationEvent, WebhookOutcome, read_back

log = logging.getLogger(__name__)


@dataclass
class ReviewResult:
    """What one review job did: `ignored` (an outcome other than reviewed) with its `detail`, or the
    comparison with the delivered prediction (`compared`, `version`, `score`, `missed`, `added`) and what it
    queued."""

    task: int
    compared: bool = False
    ignored: WebhookOutcome | None = None
    detail: str = ""
    version: str = ""
    score: float | None = None
    missed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    corrected_tasks: int | None = None
    calibration_queued: bool = False
    fit_queued: bool = False


def review_annotation(event: AnnotationEvent, rt: ReviewRuntime) -> ReviewResult:
    """Review one annotation (see the module docstring). An event that is not believed changes nothing and is
    counted by outcome. Raises LabelStudioAPIError (retryable: RQ retries) and RedisError."""
    outcome = ReviewResult(task=event.task)
    if rt.client is None:
        stored: list[dict] | tuple[WebhookOutcome, str] = (
            WebhookOutcome.UNREADABLE, "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not set on this worker")
    else:
        try:
            stored = read_back(rt.client, event)
        except LabelStudioAPIError as exc:
            if exc.retryable:
                raise  # Label Studio is down or refuses the key now: RQ retries
            stored = (WebhookOutcome.UNREADABLE, str(exc))
    annotated: dict[str, np.ndarray] = {}
    if not isinstance(stored, tuple):
        try:
            annotated = _annotation_masks(stored, rt.settings.max_image_pixels)
        except RegionSizeError as exc:
            stored = (WebhookOutcome.TOO_LARGE, f"annotation {event.annotation}: {exc}")
    if isinstance(stored, tuple):
        kind, why = stored
        rt.state.stats.count(CounterFamily.WEBHOOK, kind)
        log.warning("review of task %s ignored (%s): %s", event.task, kind.value, why)
        outcome.ignored, outcome.detail = kind, why
        return outcome
    rt.state.stats.count(CounterFamily.WEBHOOK, WebhookOutcome.REVIEWED)
    delivered = rt.state.ledger.delivered(event.project, event.task)
    if delivered is not None:
        results = rt.state.results.get_many(list(delivered.keys))
        if all(r is not None and r.ok for r in results):
            regions = [region for r in results for region in r.regions]
            size = next(iter(annotated.values())).shape if annotated else None
            predicted = shrink(label_masks(regions, size) if (regions or size) else {})
            agreement = compare(predicted, annotated)
            rt.review.put_agreement(event.project, event.task, delivered.version, agreement)
            outcome.compared, outcome.version, outcome.score = True, delivered.version, round(agreement.score, 4)
            outcome.missed, outcome.added = list(agreement.missed), list(agreement.added)
    if event.specs and (annotated or delivered is not None):
        count = rt.review.put_correction(event.project, Correction(event.task, event.specs, annotated,
                                                                         time.time()))
        outcome.corrected_tasks = count
        outcome.calibration_queued = _maybe_calibrate(rt, event, count)
        outcome.fit_queued = _maybe_fit(rt, event, count)
    return outcome


def _annotation_masks(regions: list[dict], max_pixels: int) -> dict[str, np.ndarray]:
    """Label -> shrunk mask of an annotation's regions; RegionSizeError (before allocating) over the limit."""
    try:
        return shrink(label_masks(regions, max_pixels=max_pixels))
    except RegionSizeError:
        raise
    except ValueError:  # no brush or polygon region: the annotator found nothing to label
        return {}


def _maybe_calibrate(rt: ReviewRuntime, event: AnnotationEvent, corrected: int) -> bool:
    every = rt.settings.calibrate_after
    if not every:
        return False
    current = rt.review.calibration(event.project)
    # corrected_tasks: what the project had then (`tasks` counts those used, at most MAX_CALIBRATION_TASKS)
    if corrected < ((current.corrected_tasks or current.tasks) if current else 0) + every:
        return False
    if queue_calibration(rt.queue, rt.review, event.project, rt.name, rt.settings) is None:
        return False  # one is queued or running; it will see these corrections too
    log.info("project %s has %d corrected tasks: calibration queued", event.project, corrected)
    return True


def _maybe_fit(rt: ReviewRuntime, event: AnnotationEvent, corrected: int) -> bool:
    """Queue a mask-head training once the project has CAR_FIT_AFTER more corrected tasks than the last one
    started with."""
    every = rt.settings.fit_after
    if not every:
        return False
    status = rt.review.fit_status(event.project)
    if corrected < (status.corrected_tasks if status else 0) + every:
        return False
    if queue_fit(rt.queue, rt.review, event.project, rt.name, rt.settings) is None:
        return False
    log.info("project %s has %d corrected tasks: mask-head training queued", event.project, corrected)
    return True
