"""The RQ side of a job: what a worker process runs, and delivering late tasks into Label Studio.

`run_job` is what RQ executes in a worker process (or the embedded worker):

1. a cached result is reused (a duplicate submission, or a retry after a crash);
2. otherwise the image is fetched and segmented (`pipeline.compute`) and the regions of every target are
   cached; a permanent failure (undecodable image, ...) is cached as such, a retryable one raises so RQ
   retries the job, and its last attempt caches a pending failure (CAR_PENDING_TTL) before raising;
3. tasks registered as late (their /predict stopped waiting, or `prelabel` enqueued them) whose jobs are
   all finished move into their project's outbox, which is written into Label Studio at once
   (`queue.delivery`: claims, read-back, bulk import, retries with backoff apart from this job).

Jobs take plain JSON arguments (a JobSpec's dict), see `queue.jobqueue`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from typing import Any

from redis import RedisError
from rq import get_current_job

from car_backend.engine.errors import CarError
from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.media import MediaFetcher
from car_backend.pipeline.compute import compute, pending_failure
from car_backend.pipeline.spec import JobResult, JobSpec
from car_backend.pipeline.versions import engine_fingerprint
from car_backend.queue.delivery import Deliverer, stage_ready
from car_backend.queue.store import RedisTextCache, Store
from car_backend.settings import Settings

log = logging.getLogger(__name__)


class WorkerContext:
    """What jobs need in a worker process, built once per process and installed with `install`.

    settings: the service settings; store: the Redis stores; queue: the job queue (for jobs that queue
    follow-up jobs: a `queue.jobqueue.JobQueue`, passed in so this module does not import the queue);
    name: written into the delivery claims this worker takes. The engine loads on first use of `segmenter`
    (raises ModelSpecError / ModelLoadError then).
    """

    def __init__(self, settings: Settings, store: Store, queue: Any, name: str | None = None):
        self.settings = settings
        self.store = store
        self.queue = queue
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.fetcher = MediaFetcher(settings)
        self.ls = LabelStudioClient(settings, settings.ls_timeout) if settings.can_write_predictions else None
        self.deliverer = Deliverer(store, self.ls, settings, owner=self.name) if self.ls is not None else None
        self._segmenter: Any = None
        self._lock = threading.Lock()
        self._heads: dict[str, Any] = {}  # JobSpec.head reference -> MaskHead, or None for an unusable blob

    @property
    def segmenter(self) -> Any:
        with self._lock:
            if self._segmenter is None:
                import torch  # imported only where jobs run

                from car_backend.engine import Segmenter

                if self.settings.threads:
                    torch.set_num_threads(self.settings.threads)
                ttl = self.settings.text_cache_ttl
                cache = RedisTextCache(self.store.redis, ttl) if ttl else None
                self._segmenter = Segmenter(self.settings.engine_config(), text_cache=cache)
            return self._segmenter

    def head(self, ref: str) -> Any:
        """The mask head a `JobSpec.head` reference ("<key>#<sha256>") names, loaded once per worker (per
        generation: every generation has its own key); None for "" and for a blob that is missing, corrupt,
        not the one referenced or trained on another proposal CLIP (logged once, the job runs plain CaR).
        Raises RedisError when Redis is down."""
        if not ref:
            return None
        with self._lock:
            if ref in self._heads:
                return self._heads[ref]
        from car_backend.engine.head import HeadError, head_from_bytes  # torch, only where jobs run

        key, _, digest = ref.rpartition("#")
        blob = self.store.redis.get(key)
        head = None
        if blob is None:
            log.warning("mask head %s is gone from Redis: jobs that name it run without it", key)
        elif hashlib.sha256(blob).hexdigest() != digest:
            log.warning("mask head %s does not hold the weights its jobs name: ignored", key)
        else:
            try:
                head, _, _ = head_from_bytes(blob, identity=self.segmenter.proposal_clip.name)
            except HeadError as exc:
                log.warning("mask head %s ignored: %s", key, exc)
        with self._lock:
            self._heads[ref] = head
        return head


_context: WorkerContext | None = None


def install(context: WorkerContext) -> None:
    """Make `context` the one run_job uses in this process (the worker does this at start)."""
    global _context
    _context = context


def current_context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("no worker context: car_backend.queue.jobs.install() was not called in this process")
    return _context


class EngineMismatch(CarError):
    """The worker's engine settings differ from those of the server that built the job. Retryable: another
    worker (or this one, restarted with the same settings as the server) can run the job."""

    retryable = True


def run_job(spec: dict) -> dict:
    """The RQ entry point (see the module docstring); `spec` is `JobSpec.to_dict()`."""
    ctx = current_context()
    spec = JobSpec.from_dict(spec)
    key = spec.key
    job = get_current_job()
    ctx.store.touch_late(key)  # its late records live as long as the job does
    result = ctx.store.results([key])[0]
    if result is None:
        try:
            result = _compute_and_record(ctx, spec)
        except Exception as exc:
            if job is None or not job.retries_left:  # the last attempt: answer pending, briefly cached
                ctx.store.put_result(key, pending_failure(exc, ctx.store.conditions))
                stage_ready(ctx.store, key)
            raise
        ctx.store.put_result(key, result)
    delivered = 0
    if ctx.deliverer is not None:
        delivered = ctx.deliverer.deliver_due(projects=stage_ready(ctx.store, key))
    if job is not None:
        ctx.store.release_job_lock(key, job.id)
    return {"ok": result.ok, "delivered": delivered, "seconds": round(result.seconds, 3)}


def _compute_and_record(ctx: WorkerContext, spec: JobSpec) -> JobResult:
    started = time.monotonic()
    try:
        if spec.engine != engine_fingerprint(ctx.settings):
            raise EngineMismatch(
                "this worker's engine settings (CAR_PROPOSAL_MODEL, CAR_CLASSIFIER_MODEL, CAR_SAM_CHECKPOINT, "
                "CAR_MAX_STEPS) differ from the server's; give both the same values")
        result = compute(spec, ctx.segmenter, ctx.fetcher, ctx.head(spec.head))
    except Exception as exc:
        ctx.store.record_job("error", time.monotonic() - started)
        log.warning("job %s failed (%s: %s); RQ retries it while retries are left",
                    spec.key[:12], type(exc).__name__, exc)
        raise
    ctx.store.record_job("ok" if result.ok else "failed", result.seconds)
    if not result.ok:
        log.warning("job %s failed permanently: %s", spec.key[:12], result.error)
    return result


def deliver_due() -> int:
    """Write the outboxes that are due, in this process's worker context if it has one (worker maintenance);
    never raises: a failure is logged and the next maintenance tries again."""
    if _context is None or _context.deliverer is None:
        return 0
    try:
        return _context.deliverer.deliver_due()
    except RedisError as exc:
        log.warning("could not look for due deliveries: Redis is unavailable (%s)", exc)
    except Exception:  # the worker must go on serving jobs whatever a delivery does
        log.exception("writing due deliveries failed")
    return 0
