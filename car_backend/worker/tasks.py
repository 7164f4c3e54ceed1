"""The jobs RQ runs, one entry point per `queue.jobqueue.JobName`, each a thin call into the library that
does the work, with what it needs from the process's `WorkerContext` (installed by the worker at start).

`segment` is the prediction job:

1. a cached result is reused (a duplicate submission, or a retry after a crash);
2. otherwise the image is fetched and segmented (`pipeline.compute`) and the regions of every target are
   cached; a permanent failure (undecodable image, ...) is cached as such, a retryable one raises so RQ
   retries the job, and its last attempt caches a pending failure (CAR_PENDING_TTL) before raising;
3. tasks registered as late whose jobs are all finished move into their project's outbox; a worker with a
   deliverer (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set) writes it into Label Studio at once
   (`queue.delivery`: claims, read-back, bulk import, retries apart from this job); one without leaves it
   due for a worker that has one (never dropped: the outbox waits CAR_LATE_TTL).

Jobs take plain JSON arguments (a JobSpec's dict, an event's dict, a project key) and return JSON values.
"""

from __future__ import annotations

import logging
import time

from redis import RedisError
from rq import get_current_job

from car_backend.engine.errors import CarError
from car_backend.pipeline.compute import compute, pending_failure
from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.plain import to_plain
from car_backend.pipeline.spec import JobResult, JobSpec
from car_backend.pipeline.versions import FINGERPRINT_SETTINGS, engine_fingerprint
from car_backend.queue.delivery import stage_ready
from car_backend.queue.stats import JobOutcome
from car_backend.review.calibration import calibrate_project
from car_backend.review.corrections import review_annotation
from car_backend.review.fit import fit_project
from car_backend.review.webhook import AnnotationEvent
from car_backend.worker.context import WorkerContext

log = logging.getLogger(__name__)

_context: WorkerContext | None = None


def install(context: WorkerContext | None) -> None:
    """Make `context` the one this process's jobs run with (the worker does this at start; None removes it)."""
    global _context
    _context = context


def current() -> WorkerContext:
    """The installed context; RuntimeError when the process is no worker."""
    if _context is None:
        raise RuntimeError("no worker context: car_backend.worker.tasks.install() was not called in this process")
    return _context


class EngineMismatch(CarError):
    """The worker's engine settings differ from those of the server that built the job. Retryable: another
    worker (or this one, restarted with the same settings as the server) can run the job."""

    retryable = True


def segment(spec: dict) -> dict:
    """The prediction job (see the module docstring); `spec` is `JobSpec.to_dict()`."""
    ctx = current()
    spec = JobSpec.from_dict(spec)
    key = spec.key
    job = get_current_job()
    ledger, results = ctx.state.ledger, ctx.state.results
    ledger.touch_late(key)  # its late records live as long as the job does
    result = results.get_many([key])[0]
    if result is None:
        try:
            result = _compute_and_record(ctx, spec)
        except Exception as exc:
            if job is None or not job.retries_left:  # the last attempt: answer pending, briefly cached
                results.put(key, pending_failure(exc, results.conditions))
                stage_ready(ledger, results, key)
            raise
        results.put(key, result)
    # Staging is Redis only: a worker that cannot write into Label Studio still moves finished late tasks
    # into their outbox, where a worker that can (its maintenance looks for due outboxes) writes them.
    staged = stage_ready(ledger, results, key)
    delivered = ctx.deliverer.deliver_due(projects=staged) if ctx.deliverer is not None else 0
    if job is not None:
        ctx.state.locks.release(key, job.id)
    return {"ok": result.ok, "delivered": delivered, "seconds": round(result.seconds, 3)}


def _compute_and_record(ctx: WorkerContext, spec: JobSpec) -> JobResult:
    started = time.monotonic()
    try:
        if spec.engine != engine_fingerprint(ctx.settings):
            raise EngineMismatch(f"this worker's engine settings ({', '.join(FINGERPRINT_SETTINGS)}) differ from the "
                                 "server's; give both the same values")
        result = compute(spec, ctx.segmenter(), ctx.fetcher, ctx.head(spec.head))
    except Exception as exc:
        ctx.state.stats.record_job(JobOutcome.ERROR, time.monotonic() - started)
        log.warning("job %s failed (%s: %s); RQ retries it while retries are left",
                    spec.key[:12], type(exc).__name__, exc)
        raise
    ctx.state.stats.record_job(JobOutcome.OK if result.ok else JobOutcome.FAILED, result.seconds)
    if not result.ok:
        log.warning("job %s failed permanently: %s", spec.key[:12], result.error)
    return result


def review(event: dict) -> dict:
    """The review job of one submitted annotation (review.corrections); `event` is `AnnotationEvent.to_dict()`."""
    return to_plain(review_annotation(AnnotationEvent.from_dict(event), current().review_runtime))


def calibrate(project: str) -> dict:
    """One slice of a project's calibration (review.calibration); `project` is a `ProjectId.key`."""
    return to_plain(calibrate_project(ProjectId.from_key(project), current().review_runtime))


def fit(project: str) -> dict:
    """A training of a project's mask head (review.fit); `project` is a `ProjectId.key`."""
    return to_plain(fit_project(ProjectId.from_key(project), current().review_runtime))


def deliver_due(context: WorkerContext) -> int:
    """Write the outboxes that are due with `context`'s deliverer, if it has one (worker maintenance); never
    raises: a failure is logged and the next maintenance tries again."""
    if context.deliverer is None:
        return 0
    try:
        return context.deliverer.deliver_due()
    except RedisError as exc:
        log.warning("could not look for due deliveries: Redis is unavailable (%s)", exc)
    except Exception:  # the worker must go on serving jobs whatever a delivery does
        log.exception("writing due deliveries failed")
    return 0
