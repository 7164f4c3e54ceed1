"""Re-choosing a project's thresholds from its corrections, without training anything.

`calibrate_project` re-chooses the project's keep, mask and box thresholds (theta, eta, lambda) by bounded
coordinate ascent on the mean agreement with the corrected tasks. Each image is fetched and its CLIP trunk
computed once for the whole search, text embeddings come from the caches, and the engine reuses the first
recurrent step across keep-threshold values; only the per-query part of CaR runs per candidate. Better
thresholds get a new calibration generation, which changes the project's model_version, so Label Studio
sees that its predictions changed.

It runs on the MAX_CALIBRATION_TASKS most recently annotated corrected tasks. Their images are held within
CAR_FIT_MEMORY_MB (`CalibrationImages`): each is fetched once and prepared, the most recent first; a prepared
image (with the room its first-step caches take) that no longer fits is let go, only its working-size pixels
kept, and prepared again, one at a time, for each candidate (slower, same results). A calibration that runs
out of memory all the same is recorded (`Calibration.reason`, shown at /status) and not retried before
CAR_CALIBRATE_AFTER more corrections.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from car_backend.engine.memory import is_out_of_memory, release_memory
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

MAX_CALIBRATION_TASKS = 30  # the most recently annotated corrected tasks a calibration runs on
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
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        reason = (f"out of memory ({type(exc).__name__}: {str(exc)[:160]}); CAR_FIT_MEMORY_MB="
                  f"{rt.settings.fit_memory_mb} bounds the corrected images a calibration holds")
        _record_failure(rt, project, reason)
        log.error("project %s: the calibration ran out of memory: %s", project, reason)
    finally:
        if not continued:
            rt.review.clear_calibration_progress(project)
            rt.review.unlock_calibration(project)
    release_memory()  # after the except clause: its traceback held the failed calibration's tensors
    return CalibrationRun(project=str(project), reason=reason)


def _record_failure(rt: ReviewRuntime, project: ProjectId, reason: str) -> None:
    """Keep the calibration in use (or the preset's thresholds, generation 0) with `reason`, counted at the
    project's corrected tasks now: the next try waits for CAR_CALIBRATE_AFTER more."""
    current = rt.review.calibration(project)
    count = rt.review.corrected_tasks(project)
    if current is None:
        base = get_preset(rt.settings.preset)
        start = {b.name: getattr(base, b.name) for b in THRESHOLD_BOUNDS}
        current = Calibration(generation=0, thresholds=start, previous=start, tasks=0, before=0.0, after=0.0)
    rt.review.put_calibration(project, replace(current, corrected_tasks=count, reason=reason))


def recent(corrections: Sequence[Correction], count: int = MAX_CALIBRATION_TASKS) -> list[Correction]:
    """The `count` most recently annotated of `corrections` (ordered oldest first, as ReviewStore gives
    them), in task order."""
    return sorted(corrections[-count:] if count else [], key=lambda c: c.task)


class CalibrationImages:
    """A calibration's corrected tasks with their prepared images, held within `budget` bytes.

    Each image is fetched once and prepared, the most recently annotated task first. The working-size pixels
    of every image are kept (~3 MB at 1024 px); a prepared image is kept too while its bytes plus the room
    of its first-step caches (`reserve`) fit in the budget with what is held so far. Iterating gives (correction, [(spec, prepared)]) in
    task order: a kept image as it is, any other prepared again (uncached, the same result) and let go
    before the next. Tasks whose image cannot be fetched are skipped with a warning."""

    def __init__(self, rt: ReviewRuntime, project: ProjectId, corrections: Sequence[Correction], budget: int):
        self.segmenter = rt.segmenter()
        self.budget = budget
        self.held_bytes = 0
        entries: dict[int, tuple[Correction, list[tuple[JobSpec, PreparedImage | None, np.ndarray, tuple]]]] = {}
        for correction, prepared in _prepare_each(rt, project, list(reversed(corrections)), "calibration"):
            entries[correction.task] = (correction, [self._hold(spec, image) for spec, image in prepared])
            del prepared
        self._entries = [entries[task] for task in sorted(entries)]
        self.prepared_again = sum(1 for _, rows in self._entries for row in rows if row[1] is None)
        if self.prepared_again:
            log.info("calibration of project %s: %d of its images are prepared again for each threshold set "
                     "(CAR_FIT_MEMORY_MB=%d)", project, self.prepared_again, budget // 2 ** 20)

    def _hold(self, spec: JobSpec, image: PreparedImage) -> tuple[JobSpec, PreparedImage | None, np.ndarray, tuple]:
        """What is kept of one prepared image: itself while it fits, else its working pixels and size."""
        self.held_bytes += image.rgb.nbytes
        size = image.held_bytes() + reserve(image, spec.runs)
        keep = self.held_bytes + size <= self.budget
        self.held_bytes += size if keep else 0
        return spec, image if keep else None, image.rgb, image.original_size

    @property
    def corrections(self) -> list[Correction]:
        return [correction for correction, _ in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[Correction, list[tuple[JobSpec, PreparedImage]]]]:
        for correction, rows in self._entries:
            prepared = [(spec, image if image is not None
                         else self.segmenter.prepare(rgb, cache=False, original_size=original_size))
                        for spec, image, rgb, original_size in rows]
            yield correction, prepared
            del prepared


def reserve(image: PreparedImage, runs: Sequence[Run]) -> int:
    """Bytes the first-step caches of a prepared image may come to hold for these runs (float32 soft masks of
    a run's queries at working size, for each cache entry)."""
    from car_backend.engine.segmenter import FIRST_PROPOSALS_CACHE_SIZE, FIRST_STEP_CACHE_SIZE

    height, width = image.rgb.shape[:2]
    queries = max((len(run.queries) for run in runs), default=0)
    return (FIRST_STEP_CACHE_SIZE + FIRST_PROPOSALS_CACHE_SIZE) * queries * height * width * 4


def prepared_corrections(rt: ReviewRuntime, project: ProjectId, corrections: list[Correction], purpose: str
                         ) -> list[tuple[Correction, list[tuple[JobSpec, PreparedImage]]]]:
    """Each correction with its specs' images fetched and prepared (trunk computed, not cached by the
    segmenter); a task whose image cannot be fetched is skipped with a warning naming `purpose`. Retryable
    media errors skip too. Holds them all: `_prepare_each` gives them one at a time."""
    return list(_prepare_each(rt, project, corrections, purpose))


def _prepare_each(rt: ReviewRuntime, project: ProjectId, corrections: Sequence[Correction], purpose: str
                  ) -> Iterator[tuple[Correction, list[tuple[JobSpec, PreparedImage]]]]:
    """`prepared_corrections`, one correction at a time."""
    segmenter = rt.segmenter()
    for correction in corrections:
        try:
            prepared = [(spec, segmenter.prepare(rt.fetcher.fetch(spec.image, spec.task_id), cache=False))
                        for spec in correction.specs]
        except MediaError as exc:
            log.warning("%s of project %s skips task %s: %s", purpose, project, correction.task, exc)
            continue
        yield correction, prepared
        del prepared


def _calibrate(rt: ReviewRuntime, project: ProjectId) -> CalibrationRun:
    started = time.monotonic()
    everything = rt.review.corrections(project)
    items = CalibrationImages(rt, project, recent(everything), rt.settings.fit_memory_mb * 2 ** 20)
    status = rt.review.fit_status(project)
    head = rt.head(status.head if status is not None else "")  # thresholds for the masks the project gets
    if not items:
        return CalibrationRun(project=str(project), reason="no corrected task could be read")
    current = rt.review.calibration(project)
    first = items.corrections[0]
    base = get_preset(first.specs[0].runs[0].preset or rt.settings.preset)
    start = dict(current.thresholds) if current else {b.name: getattr(base, b.name) for b in THRESHOLD_BOUNDS}
    segmenter = rt.segmenter()

    # The search's runs, reused for the per-label figures, and by the next slices (same tasks, same start).
    evaluated: dict[tuple, ProjectAgreement] = {}
    tasks = tuple(correction.task for correction in items.corrections)
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
                predicted = task_masks(segmenter, [(spec.runs, image) for spec, image in prepared], thresholds, head)
                total.add(compare(shrink(predicted), correction.masks))
                del prepared  # an image prepared again goes before the next is
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
        tasks=len(items),
        before=round(found.start_score, 6),
        after=round(found.score if improved else found.start_score, 6),
        labels_before={row["label"]: round(row["iou"], 6) for row in before.summary()},
        labels_after={row["label"]: round(row["iou"], 6) for row in (after if improved else before).summary()},
        evaluations=found.evaluations,
        seconds=round(time.monotonic() - started, 3),
        corrected_tasks=len(everything),
    )
    # Stored even when nothing improved (generation 0 changes no version): the next try waits for more tasks.
    rt.review.put_calibration(project, calibration)
    log.info("project %s calibrated on %d tasks: agreement %.3f -> %.3f, thresholds %s (generation %d)",
             project, len(items), calibration.before, calibration.after, calibration.thresholds, generation)
    return CalibrationRun(project=str(project), calibrated=improved, calibration=calibration)


def task_masks(segmenter: Segmenter, images: Sequence[tuple[tuple[Run, ...], PreparedImage]],
               thresholds: dict[str, float], head: MaskHead | None = None) -> dict[str, np.ndarray]:
    """Label name -> mask of what the engine predicts for a task's prepared images (each with its runs)."""
    masks: dict[str, np.ndarray] = {}
    for runs, prepared in images:
        for label, mask in predicted_masks(segmenter, runs, prepared, thresholds, head).items():
            add_mask(masks, label, mask)
    return masks


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
