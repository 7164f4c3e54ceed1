"""Re-choosing a project's thresholds from its corrections, without training anything.

`calibrate_project` re-chooses the project's keep, mask and box thresholds (theta, eta, lambda) by bounded
coordinate ascent on the mean agreement with the corrected tasks. Each image is fetched and its CLIP trunk
computed once for the whole search, text embeddings come from the caches, and the engine reuses the first
recurrent step across keep-threshold values; only the per-query part of CaR runs per candidate. Better
thresholds get a new calibration generation, which changes the project's model_version, so Label Studio
sees that its predictions changed.

A calibration runs in slices of about CALIBRATION_SLICE_S seconds, so a worker goes back to the queues
(interactive jobs first) between them: when a slice's time is up, the candidates scored so far are kept in
`car:review:<p>:calibration-progress` and another slice is queued (batch queue, behind every interactive
job); it replays the deterministic search from those scores and goes on. The project's calibration lock
stays held until the last slice.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from car_backend.engine.presets import get_preset
from car_backend.labelstudio.media import MediaError
from car_backend.labelstudio.regions import add_mask, shrink
from car_backend.pipeline.compute import restrict, segment_run
from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.spec import JobSpec, Run
from car_backend.review.agreement import ProjectAgreement, compare, search
from car_backend.review.runtime import ReviewRuntime
from car_backend.review.store import THRESHOLD_BOUNDS, Calibration, CalibrationProgress, Correction
from car_backend.review.triggers import CALIBRATION_LOCK_S, continue_calibration

if TYPE_CHECKING:
    from car_backend.engine.head import MaskHead
    from car_backend.engine.segmenter import PreparedImage, Segmenter

log = logging.getLogger(__name__)

# The highest task ids among the corrected tasks (their trunks stay in memory during the search).
MAX_CALIBRATION_TASKS = 30
CALIBRATION_SLICE_S = 30.0  # scoring time per calibration job (at least one candidate each); then a new job


class _SliceOver(Exception):
    """This calibration slice's time is up; its progress is stored and the next slice is queued."""


@dataclass(frozen=True)
class CalibrationRun:
    """What one calibration job did: `continued` (a slice whose successor is queued), or the stored
    `calibration` and whether it changed the thresholds (`calibrated`), or why nothing was tried (`reason`)."""

    project: str
    calibrated: bool = False
    continued: bool = False
    reason: str = ""
    calibration: Calibration | None = None


def calibrate_project(project: ProjectId, rt: ReviewRuntime) -> CalibrationRun:
    """One slice of a calibration (see the module docstring), the last of which stores the calibration and
    releases the project's lock. Raises what fetching and the engine raise (the lock is released)."""
    continued = False
    try:
        return _calibrate(rt, project)
    except _SliceOver:
        continued = True
        continue_calibration(rt.queue, rt.review, project, rt.settings, continued=True)
        return CalibrationRun(project=str(project), continued=True)
    finally:
        if not continued:
            rt.review.clear_calibration_progress(project)
            rt.review.unlock_calibration(project)


def prepared_corrections(rt: ReviewRuntime, project: ProjectId, corrections: list[Correction], purpose: str
                         ) -> list[tuple[Correction, list[tuple[JobSpec, PreparedImage]]]]:
    """Each correction with its specs' images fetched and prepared (trunk computed) once; a task whose image
    cannot be fetched is skipped with a warning naming `purpose`. Retryable media errors skip too."""
    items = []
    segmenter = rt.segmenter()
    for correction in corrections:
        try:
            prepared = [(spec, segmenter.prepare(rt.fetcher.fetch(spec.image, spec.task_id)))
                        for spec in correction.specs]
        except MediaError as exc:
            log.warning("%s of project %s skips task %s: %s", purpose, project, correction.task, exc)
            continue
        items.append((correction, prepared))
    return items


def _calibrate(rt: ReviewRuntime, project: ProjectId) -> CalibrationRun:
    started = time.monotonic()
    corrections = rt.review.corrections(project)[-MAX_CALIBRATION_TASKS:]
    items = prepared_corrections(rt, project, corrections, "calibration")
    status = rt.review.fit_status(project)
    head = rt.head(status.head if status is not None else "")  # thresholds for the masks the project gets
    if not items:
        return CalibrationRun(project=str(project), reason="no corrected task could be read")
    current = rt.review.calibration(project)
    base = get_preset(items[0][1][0][0].runs[0].preset or rt.settings.preset)
    start = dict(current.thresholds) if current else {b.name: getattr(base, b.name) for b in THRESHOLD_BOUNDS}
    segmenter = rt.segmenter()

    # The search's runs, reused for the per-label figures, and by the next slices (same tasks, same start).
    evaluated: dict[tuple, ProjectAgreement] = {}
    tasks = tuple(correction.task for correction, _ in items)
    progress = rt.review.calibration_progress(project)
    if progress is not None and progress.tasks == tasks and progress.start == start:
        evaluated = {tuple(tuple(pair) for pair in json.loads(key)): ProjectAgreement.from_fields(fields)
                     for key, fields in progress.evaluated.items()}
        started -= progress.seconds
    slice_ends = time.monotonic() + CALIBRATION_SLICE_S
    scored_here = 0

    def agreement(thresholds: dict[str, float]) -> ProjectAgreement:
        nonlocal scored_here
        key = tuple(sorted(thresholds.items()))
        if key not in evaluated:
            if scored_here and time.monotonic() > slice_ends:
                rt.review.put_calibration_progress(project, CalibrationProgress(
                    tasks=tasks, start=start, seconds=time.monotonic() - started,
                    evaluated={json.dumps(k): v.to_fields() for k, v in evaluated.items()}),
                    ttl=CALIBRATION_LOCK_S)
                raise _SliceOver()
            scored_here += 1
            total = ProjectAgreement()
            for correction, prepared in items:
                predicted: dict[str, np.ndarray] = {}
                for spec, image in prepared:
                    for label, mask in predicted_masks(segmenter, spec.runs, image, thresholds, head).items():
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
    rt.review.put_calibration(project, calibration)
    log.info("project %s calibrated on %d tasks: agreement %.3f -> %.3f, thresholds %s (generation %d)",
             project, len(items), calibration.before, calibration.after, calibration.thresholds, generation)
    return CalibrationRun(project=str(project), calibrated=improved, calibration=calibration)


def predicted_masks(segmenter: Segmenter, runs: tuple[Run, ...], prepared: PreparedImage,
                    thresholds: dict[str, float], head: MaskHead | None = None) -> dict[str, np.ndarray]:
    """Label name -> mask of what the engine predicts for one prepared image with these thresholds (and this
    mask head, if any)."""
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
