"""The active-learning jobs: learn from annotators' corrections without training anything.

`review_annotation` (queued by /webhook for ANNOTATION_CREATED/UPDATED) reads the annotation back from Label
Studio by its id (the webhook itself carries no credentials, so nothing in it but ids is believed) and compares it with
the prediction this backend delivered for the task: IoU per label, labels missed, labels added wrongly. It
keeps the annotation's masks, and once a project has CAR_CALIBRATE_AFTER corrected tasks (and again after
each further CAR_CALIBRATE_AFTER) it queues `calibrate_project`.

`calibrate_project` re-chooses the project's keep, mask and box thresholds (theta, eta, lambda) by bounded
coordinate ascent on the mean agreement with the corrected tasks. Each image is fetched and its CLIP trunk
computed once for the whole search, text embeddings come from the caches, and the engine reuses the first
recurrent step across keep-threshold values; only the per-query part of CaR runs per candidate. Better
thresholds get a new calibration generation, which changes the project's model_version, so Label Studio
sees that its predictions changed.

A calibration runs in slices of about CALIBRATION_SLICE_S seconds, so a worker goes back to the queues
(interactive jobs first) between them: when a slice's time is up, the candidates scored so far are kept in
`car:review:<p>:calibration-progress` and `calibrate_project` is queued again (batch queue, behind every
interactive job); the next slice replays the deterministic search from those scores and goes on. The
project's calibration lock stays held until the last slice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from car_backend.engine.presets import get_preset
from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from car_backend.labelstudio.media import MediaError
from car_backend.labelstudio.regions import RegionSizeError, add_mask, label_masks, shrink
from car_backend.pipeline.compute import restrict, segment_run
from car_backend.pipeline.plain import from_plain, to_plain
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobSpec, Run
from car_backend.queue.jobs import WorkerContext, current_context
from car_backend.queue.store import STATS_KEY
from car_backend.review.agreement import ProjectAgreement, compare, search
from car_backend.review.heads import HeadStore, queue_fit
from car_backend.review.store import THRESHOLD_BOUNDS, Calibration, Correction, ReviewStore

log = logging.getLogger(__name__)

MAX_CALIBRATION_TASKS = 30  # the most recent corrected tasks a calibration uses (their trunks stay in memory)
CALIBRATION_LOCK_S = 3600
CALIBRATION_SLICE_S = 30.0  # scoring time per calibration job (at least one candidate each); then a new job


class _SliceOver(Exception):
    """This calibration slice's time is up; its progress is stored and the next slice is queued."""


@dataclass(frozen=True)
class AnnotationEvent:
    """The review job's input: which annotation of which task to read back from Label Studio, and how this
    backend predicts the task. The webhook's regions are not part of it: they are never believed. Travels as
    JSON (`to_dict`/`from_dict`)."""

    project: str
    task: int
    annotation: int  # the annotation's id in Label Studio
    label_config_sha: str  # sha256 of the label config the specs were planned with (checked against LS's)
    specs: tuple[JobSpec, ...]  # how this backend predicts the task now

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> AnnotationEvent:
        return from_plain(cls, data)


REVIEWED_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
# How a review job ended, counted in car:stats as `webhook:<outcome>` (car_webhook_annotations in /metrics).
EVENT_OUTCOMES = ("reviewed", "unknown", "mismatch", "cancelled", "config_changed", "too_large", "unreadable")
MAX_ID = 2**63 - 1


def annotation_event(body: dict, projects: Any, settings: Any) -> AnnotationEvent | str:
    """The review job's input from a webhook payload, or why there is nothing to review.

    Only ids and the label config are taken from the payload (nothing of its size is allocated here); the
    job reads the annotation back from Label Studio (`review_annotation`). Raises ValueError for a payload
    that is not a Label Studio annotation event, and RedisError (from reading the project's state) when
    Redis is down.
    """
    annotation, task, project = (body.get(k) for k in ("annotation", "task", "project"))
    if not isinstance(annotation, dict) or not _is_id(annotation.get("id")):
        raise ValueError("an annotation event needs an 'annotation' object with an integer 'id'")
    if annotation.get("was_cancelled"):
        return "the annotation was skipped (cancelled)"
    if not isinstance(task, dict) or not _is_id(task.get("id")) or not isinstance(task.get("data"), dict):
        raise ValueError("an annotation event needs a 'task' object with an integer 'id' and a 'data' object")
    if not isinstance(project, dict) or not _is_id(project.get("id")):
        raise ValueError("an annotation event needs a 'project' object with an integer 'id'")
    if not settings.can_write_predictions:
        return ("annotation events are used only with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set: each "
                "annotation is read back from Label Studio before it is believed")
    label_config = project.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        return "the event carries no label config"
    parsed = projects.for_predict(project["id"], label_config)
    plan = plan_task(task, parsed, settings)
    return AnnotationEvent(project=str(project["id"]), task=task["id"], annotation=annotation["id"],
                           label_config_sha=_sha(label_config), specs=tuple(plan.specs))


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read_back(settings: Any, event: AnnotationEvent) -> list[dict] | tuple[str, str]:
    """The annotation's result as Label Studio stores it, or (outcome, why) when the event is not believed:
    Label Studio does not know the annotation or the project, the annotation belongs to another task or
    project, was cancelled, or the project's label config is not the one the event was planned with.
    The task itself is not read back: Label Studio's GET /api/tasks/<id>/ asks this backend's /predict for a
    task without a current prediction, which would wait on the worker running this job.
    Raises LabelStudioAPIError (retryable: RQ retries) when Label Studio cannot answer now."""
    client = LabelStudioClient(settings)
    stored = client.annotation(event.annotation)
    if stored is None:
        return "unknown", f"Label Studio has no annotation {event.annotation}"
    if stored.get("task") != event.task or stored.get("project", int(event.project)) != int(event.project):
        return "mismatch", (f"annotation {event.annotation} belongs to task {stored.get('task')!r} of project "
                            f"{stored.get('project')!r}, not task {event.task} of project {event.project}")
    if stored.get("was_cancelled"):
        return "cancelled", f"annotation {event.annotation} was skipped (cancelled)"
    if not isinstance(stored.get("result"), list):
        return "unreadable", f"annotation {event.annotation} has no result list"
    try:
        config = client.project(int(event.project)).get("label_config")
    except LabelStudioAPIError as exc:
        if exc.retryable:
            raise
        return "unknown", f"project {event.project} cannot be read: {exc}"
    if not isinstance(config, str) or _sha(config) != event.label_config_sha:
        return "config_changed", f"project {event.project}'s label config is not the one the event carried"
    return stored["result"]


def review_annotation(event: dict) -> dict:
    """The RQ job for one submitted annotation (see the module docstring); `event` is
    `AnnotationEvent.to_dict()`. The annotation is read back from Label Studio first; an event that is not
    believed changes nothing and is counted by outcome."""
    ctx = current_context()
    event = AnnotationEvent.from_dict(event)
    review = ReviewStore(ctx.store.redis)
    outcome: dict[str, Any] = {"task": event.task, "compared": False}
    try:
        stored = read_back(ctx.settings, event)
    except LabelStudioAPIError as exc:
        if exc.retryable:
            raise  # Label Studio is down or refuses the key now: RQ retries
        stored = ("unreadable", str(exc))
    annotated: dict[str, np.ndarray] = {}
    if not isinstance(stored, tuple):
        try:
            annotated = _annotation_masks(stored, ctx.settings.max_image_pixels)
        except RegionSizeError as exc:
            stored = ("too_large", f"annotation {event.annotation}: {exc}")
    if isinstance(stored, tuple):
        kind, why = stored
        _count(ctx, kind)
        log.warning("review of task %s ignored (%s): %s", event.task, kind, why)
        return {**outcome, "ignored": kind, "detail": why}
    _count(ctx, "reviewed")
    delivered = ctx.store.delivered(event.task)
    if delivered is not None:
        results = ctx.store.results(list(delivered.keys))
        if all(r is not None and r.ok for r in results):
            regions = [region for r in results for region in r.regions]
            size = next(iter(annotated.values())).shape if annotated else None
            predicted = shrink(label_masks(regions, size) if (regions or size) else {})
            agreement = compare(predicted, annotated)
            review.put_agreement(event.project, event.task, delivered.version, agreement)
            outcome.update(compared=True, version=delivered.version, score=round(agreement.score, 4),
                           missed=list(agreement.missed), added=list(agreement.added))
    if event.specs and (annotated or delivered is not None):
        count = review.put_correction(event.project, Correction(event.task, event.specs, annotated))
        outcome["corrected_tasks"] = count
        outcome["calibration_queued"] = _maybe_queue_calibration(ctx, review, event.project, count)
        outcome["fit_queued"] = _maybe_queue_fit(ctx, event.project, count)
    return outcome


def _count(ctx: WorkerContext, outcome: str) -> None:
    ctx.store.redis.hincrby(STATS_KEY, f"webhook:{outcome}", 1)


def _annotation_masks(regions: list[dict], max_pixels: int) -> dict[str, np.ndarray]:
    """Label -> shrunk mask of an annotation's regions; RegionSizeError (before allocating) over the limit."""
    try:
        return shrink(label_masks(regions, max_pixels=max_pixels))
    except RegionSizeError:
        raise
    except ValueError:  # no brush or polygon region: the annotator found nothing to label
        return {}


def _maybe_queue_calibration(ctx: WorkerContext, review: ReviewStore, project: str, corrected: int) -> bool:
    every = ctx.settings.calibrate_after
    if not every:
        return False
    current = review.calibration(project)
    if corrected < (current.tasks if current else 0) + every:
        return False
    if not review.try_lock_calibration(project, ctx.name, CALIBRATION_LOCK_S):
        return False  # one is queued or running; it will see these corrections too
    ctx.queue.submit_call(calibrate_project, (project,), description=f"calibrate project {project}",
                          timeout=max(ctx.settings.job_timeout, CALIBRATION_LOCK_S))
    log.info("project %s has %d corrected tasks: calibration queued", project, corrected)
    return True


def _maybe_queue_fit(ctx: WorkerContext, project: str, corrected: int) -> bool:
    """Queue a mask-head training once the project has CAR_FIT_AFTER more corrected tasks than the last one
    started with."""
    every = ctx.settings.fit_after
    if not every:
        return False
    status = HeadStore(ctx.store.redis).status(project)
    if corrected < (status.corrected_tasks if status else 0) + every:
        return False
    job = queue_fit(ctx.queue, ctx.store.redis, project, ctx.name, fit_timeout(ctx.settings))
    if job is not None:
        log.info("project %s has %d corrected tasks: mask-head training queued", project, corrected)
    return job is not None


def fit_timeout(settings: Any) -> int:
    """RQ timeout of a training job: its time budget, plus time to fetch, prepare and evaluate."""
    return int(max(settings.job_timeout, 2 * settings.fit_seconds + 600))


def calibrate_project(project: str) -> dict:
    """The RQ job that re-chooses a project's thresholds (see the module docstring): one slice of it, the
    last of which stores the calibration; {"project", "continued": True} for the others."""
    ctx = current_context()
    review = ReviewStore(ctx.store.redis)
    continued = False
    try:
        return _calibrate(ctx, review, project)
    except _SliceOver:
        continued = True
        ctx.queue.submit_call(calibrate_project, (project,), description=f"calibrate project {project} (continued)",
                              timeout=max(ctx.settings.job_timeout, CALIBRATION_LOCK_S))
        return {"project": project, "continued": True}
    finally:
        if not continued:
            review.clear_calibration_progress(project)
            review.unlock_calibration(project)


def prepared_corrections(ctx: WorkerContext, project: str, corrections: list[Correction], purpose: str
                         ) -> list[tuple[Correction, list[tuple[JobSpec, Any]]]]:
    """Each correction with its specs' images fetched and prepared (trunk computed) once; a task whose image
    cannot be fetched is skipped with a warning naming `purpose`. Retryable media errors skip too."""
    items = []
    for correction in corrections:
        try:
            prepared = [(spec, ctx.segmenter.prepare(ctx.fetcher.fetch(spec.image, spec.task_id)))
                        for spec in correction.specs]
        except MediaError as exc:
            log.warning("%s of project %s skips task %s: %s", purpose, project, correction.task, exc)
            continue
        items.append((correction, prepared))
    return items


def _calibrate(ctx: WorkerContext, review: ReviewStore, project: str) -> dict:
    started = time.monotonic()
    corrections = review.corrections(project)[-MAX_CALIBRATION_TASKS:]
    items = prepared_corrections(ctx, project, corrections, "calibration")
    head = ctx.head(_adopted_head(ctx, project))  # thresholds are chosen for the masks the project gets
    if not items:
        return {"project": project, "calibrated": False, "reason": "no corrected task could be read"}
    current = review.calibration(project)
    base = _base_preset(ctx, items[0][1][0][0])
    start = dict(current.thresholds) if current else {b.name: getattr(base, b.name) for b in THRESHOLD_BOUNDS}

    # The search's runs, reused for the per-label figures, and by the next slices (same tasks, same start).
    evaluated: dict[tuple, ProjectAgreement] = {}
    tasks = [correction.task for correction, _ in items]
    progress = review.calibration_progress(project)
    if progress is not None and progress["tasks"] == tasks and progress["start"] == start:
        evaluated = {tuple(tuple(pair) for pair in json.loads(key)): ProjectAgreement.from_fields(fields)
                     for key, fields in progress["evaluated"].items()}
        started -= progress["seconds"]
    slice_ends = time.monotonic() + CALIBRATION_SLICE_S
    scored_here = 0

    def agreement(thresholds: dict[str, float]) -> ProjectAgreement:
        nonlocal scored_here
        key = tuple(sorted(thresholds.items()))
        if key not in evaluated:
            if scored_here and time.monotonic() > slice_ends:
                review.put_calibration_progress(project, {
                    "tasks": tasks, "start": start, "seconds": time.monotonic() - started,
                    "evaluated": {json.dumps(k): v.to_fields() for k, v in evaluated.items()}}, CALIBRATION_LOCK_S)
                raise _SliceOver()
            scored_here += 1
            total = ProjectAgreement()
            for correction, prepared in items:
                predicted: dict[str, np.ndarray] = {}
                for spec, image in prepared:
                    for label, mask in predicted_masks(ctx.segmenter, spec.runs, image, thresholds, head).items():
                        add_mask(predicted, label, mask)
                total.add(compare(shrink(predicted), correction.masks))
            evaluated[key] = total
        return evaluated[key]

    found = search(lambda t: agreement(t).mean_score or 0.0, THRESHOLD_BOUNDS, start)
    before, after = agreement(start), agreement(found.best)
    improved = found.score > found.start_score + 1e-9
    generation = (current.generation if current else 0) + (1 if improved else 0)
    calibration = Calibration(
        generation=generation,
        thresholds=found.best if improved else start,
        previous=start,
        tasks=len(corrections),
        before=round(found.start_score, 6),
        after=round(found.score if improved else found.start_score, 6),
        labels_before={row["label"]: round(row["iou"], 6) for row in before.summary()},
        labels_after={row["label"]: round(row["iou"], 6) for row in (after if improved else before).summary()},
        evaluations=found.evaluations,
        seconds=round(time.monotonic() - started, 3),
    )
    # Stored even when nothing improved (generation 0 changes no version): the next try waits for more tasks.
    review.put_calibration(project, calibration)
    log.info("project %s calibrated on %d tasks: agreement %.3f -> %.3f, thresholds %s (generation %d)",
             project, len(items), calibration.before, calibration.after, calibration.thresholds, generation)
    return {"project": project, "calibrated": improved, **calibration.__dict__}


def _base_preset(ctx: WorkerContext, spec: JobSpec) -> Any:
    return get_preset(spec.runs[0].preset or ctx.settings.preset)


def _adopted_head(ctx: WorkerContext, project: str) -> str:
    status = HeadStore(ctx.store.redis).status(project)
    return status.head if status is not None else ""


def predicted_masks(segmenter: Any, runs: tuple[Run, ...], prepared: Any, thresholds: dict[str, float],
                    head: Any = None) -> dict[str, np.ndarray]:
    """Label name -> mask of what the engine predicts for one prepared image with these thresholds (and this
    mask head, an engine.head.MaskHead, if any)."""
    masks: dict[str, np.ndarray] = {}
    for run in runs:
        seg = segment_run(segmenter, prepared, run, thresholds, head)
        for out in run.outputs:
            if run.mode == "referring":
                masks[out.labels[0].value] = seg.label_map == 1
                continue
            own = restrict(seg, [label.prompt for label in out.labels])
            for i, label in enumerate(out.labels):
                add_mask(masks, label.value, own.label_map == i + 1)
    return {label: mask for label, mask in masks.items() if mask.any()}
