"""When a project's thresholds are re-chosen or its mask head trained: one lock per project and kind, then a
job on the batch queue. Torch-free: the HTTP server queues trainings (START_TRAINING) through it."""

from __future__ import annotations

import logging

from car_backend.pipeline.identity import ProjectId
from car_backend.queue.jobqueue import JobName, JobQueue
from car_backend.review.store import FitState, FitStatus, ReviewStore
from car_backend.settings import Settings

log = logging.getLogger(__name__)

CALIBRATION_LOCK_S = 3600


def calibration_timeout(settings: Settings) -> int:
    """RQ timeout of one calibration slice (the lock's lifetime at least)."""
    return max(settings.job_timeout, CALIBRATION_LOCK_S)


def fit_timeout(settings: Settings) -> int:
    """RQ timeout of a training job: its time budget, plus time to fetch, prepare and evaluate."""
    return int(max(settings.job_timeout, 2 * settings.fit_seconds + 600))


def queue_calibration(queue: JobQueue, review: ReviewStore, project: ProjectId, owner: str,
                      settings: Settings) -> str | None:
    """Queue a calibration of `project` if none is queued or running (its lock is taken for `owner`); its RQ
    job id, or None when one is (it will see the same corrections). Raises RedisError."""
    if not review.try_lock_calibration(project, owner, CALIBRATION_LOCK_S):
        return None
    return continue_calibration(queue, review, project, settings)


def continue_calibration(queue: JobQueue, review: ReviewStore, project: ProjectId, settings: Settings,
                         continued: bool = False) -> str:
    """Queue a calibration slice of `project`, whose lock the caller holds (released if queueing fails)."""
    try:
        return queue.submit_call(JobName.CALIBRATE, (project.key,),
                                 description=f"calibrate project {project}{' (continued)' if continued else ''}",
                                 timeout=calibration_timeout(settings))
    except Exception:
        review.unlock_calibration(project)
        raise


def queue_fit(queue: JobQueue, review: ReviewStore, project: ProjectId, owner: str, settings: Settings) -> str | None:
    """Queue a training of `project`'s mask head on the batch queue; its RQ job id, or None when one is
    already queued or running (it will see the same corrections). Raises RedisError."""
    if not review.try_lock_fit(project, owner):
        return None
    current = review.fit_status(project) or FitStatus()
    current.state, current.reason = FitState.QUEUED, ""
    review.put_fit_status(project, current)
    try:
        return queue.submit_call(JobName.FIT, (project.key,), description=f"fit the mask head of project {project}",
                                 timeout=fit_timeout(settings))
    except Exception:
        review.unlock_fit(project)
        raise
