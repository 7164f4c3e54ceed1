"""The RQ side of a job: what a worker process runs, and delivering late tasks into Label Studio.

`run_job` is what RQ executes in a worker process (or the embedded worker):

1. a cached result is reused (a retry after a failed delivery, or a duplicate submission);
2. otherwise the image is fetched and segmented (`pipeline.compute`) and the regions of every target are
   cached; a permanent failure (undecodable image, ...) is cached as such, a retryable one raises so RQ
   retries the job;
3. tasks registered as late (their /predict stopped waiting, or `prelabel` enqueued them) are written
   into Label Studio through the API, each one only if this worker wins its delivery claim.

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

from rq import get_current_job

from car_backend.engine.errors import CarError
from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient
from car_backend.labelstudio.media import MediaFetcher
from car_backend.pipeline.compute import compute, task_entry
from car_backend.pipeline.spec import JobResult, JobSpec
from car_backend.pipeline.versions import engine_fingerprint
from car_backend.queue.store import LateRecord, RedisTextCache, Store
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
        self.ls = LabelStudioClient(settings) if settings.can_write_predictions else None
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
    result = ctx.store.results([key])[0]
    if result is None:
        result = _compute_and_record(ctx, spec)
        ctx.store.put_result(key, result)
    delivered = deliver_late(ctx, key)
    job = get_current_job()
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


def deliver_late(ctx: WorkerContext, key: str) -> int:
    """Write the late tasks waiting on `key` into Label Studio (those whose every job is finished)."""
    if ctx.ls is None:
        return 0
    delivered = 0
    for record in ctx.store.late(key):
        results = ctx.store.results(record.keys)
        if any(r is None for r in results):
            continue  # the job finishing last delivers it
        delivered += deliver(ctx.store, ctx.ls, record, results, owner=f"worker:{ctx.name}")
    return delivered


def deliver(store: Store, ls: LabelStudioClient, record: LateRecord, results: list[JobResult], owner: str) -> int:
    """Post one task's prediction if this caller wins its claim; 1 when it was posted here.

    A retryable API failure gives the claim back and raises (the job is retried and finds its result
    cached); any other (the task is gone) drops the record.
    """
    entry = task_entry(results, record.version)
    posted = 0
    if store.claim([record.task], record.version, owner)[0]:
        try:
            ls.create_prediction(record.task, entry)
        except LabelStudioAPIError as exc:
            store.release_claim(record.task, record.version, owner)
            if exc.retryable:
                raise
            log.error("dropping the prediction for task %s: %s", record.task, exc)
        else:
            posted = 1
            store.record_delivery("api")
            store.record_delivered([(record.task, record.version, record.keys)])
            log.info("wrote the prediction for task %s into Label Studio", record.task)
    store.remove_late(record)
    return posted
