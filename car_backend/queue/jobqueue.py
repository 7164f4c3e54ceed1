"""The job queue: RQ on REDIS_URL, or on a private embedded Redis when REDIS_URL is unset.

Two RQ queues: `<CAR_QUEUE>-interactive` (a person is waiting: a single-task or interactive /predict) and
`<CAR_QUEUE>` (batches: multi-task /predict, prelabel, review, calibration and training jobs). Workers serve
the interactive one first.

Jobs are serialized as JSON (RQ's JSONSerializer): a job's arguments are plain dicts (`JobSpec.to_dict()`),
so nothing a worker reads from Redis is a pickle. A job whose data is not JSON (pickled by an older version),
or that names a function other than a `JobName`, is never run: CarQueue moves it to the failed registry when
it is dequeued, and the worker goes on.

Submission is deduplicated per job key: `car:job:<K>` names the live RQ job computing K; it is written in
the same MULTI/EXEC as the job itself (WATCHed), so two requests for the same key never create two jobs,
and a lock left by a job that failed, finished or vanished is taken over. `submit_many` does the same for
SUBMIT_CHUNK keys per transaction (a 10,000-task /predict makes a few dozen round trips, not 50,000).

Interactive work never waits behind batch work: an interactive submission whose key has a live job still
queued on the batch queue moves that job to the interactive queue (`promote`, one Lua script: off the batch
list, origin changed, onto the interactive list), where it runs next; a job already running is joined.
And an interactive job does not wait for the batch job a worker runs: each worker has an interactive lane, a
second process that listens to the interactive queue only (worker.process.Lane, CAR_INTERACTIVE_LANE).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum

from redis import Redis, WatchError
from rq import Queue, Retry
from rq.exceptions import DequeueTimeout, DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from car_backend.pipeline.spec import JobSpec
from car_backend.queue import rqcompat
from car_backend.queue.results import JobLocks
from car_backend.settings import Settings

log = logging.getLogger(__name__)

LIVE = frozenset({JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED})
TERMINAL = frozenset({JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.FINISHED})
SERIALIZER = JSONSerializer
RQ_RESULT_TTL = 600  # RQ's own copy of the return value; the result itself lives in car:result:<K>
FAILURE_TTL = 24 * 3600
# Idle workers block on the interactive queue and look at the batch queue this often (seconds).
BATCH_POLL_S = 0.1
SUBMIT_CHUNK = 500  # keys per WATCH/MULTI transaction of submit_many
SUBMIT_ATTEMPTS = 3  # a chunk whose locks keep changing under it falls back to one transaction per key
WORKER_TTL_S = 20  # an idle worker's registration lives this long between heartbeats (RQ adds 60 s)
MAX_SILENCE_S = WORKER_TTL_S + 5  # a worker silent for longer is not counted as alive

# KEYS: batch list, interactive list, job hash, queues set; ARGV: job id, interactive queue name.
_PROMOTE = """
if redis.call('lrem', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('hset', KEYS[3], 'origin', ARGV[2])
  redis.call('rpush', KEYS[2], ARGV[1])
  redis.call('sadd', KEYS[4], KEYS[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class QueueDepth:
    """Jobs waiting on each queue, running (`started`), and in the failed registries."""

    interactive: int
    batch: int
    started: int
    failed: int


class JobName(str, Enum):
    """Every job car-backend queues, by the one stable import path RQ stores with it (the worker's entry
    points, `car_backend.worker.tasks`; tests/test_jobs.py resolves each). A dequeued job naming anything
    else (queued by an older version) is failed with the reason, never run."""

    SEGMENT = "car_backend.worker.tasks.segment"
    REVIEW = "car_backend.worker.tasks.review"
    CALIBRATE = "car_backend.worker.tasks.calibrate"
    FIT = "car_backend.worker.tasks.fit"


JOB_NAMES = frozenset(name.value for name in JobName)


def queue_names(settings: Settings) -> tuple[str, str]:
    """(interactive, batch): the order workers serve them in."""
    return f"{settings.queue}-interactive", settings.queue


class CarQueue(Queue):
    """An RQ queue whose multi-queue dequeue keeps the job in the intermediate list until it starts.

    RQ pops with BLPOP when a worker listens on several queues, so a worker killed between the pop and
    the start of the job would lose it. Moving with LMOVE into the queue's intermediate list instead lets
    RQ's maintenance requeue such a job (IntermediateQueue.cleanup).

    A dequeued job whose data does not deserialize (pickled by an older version) is failed here, without
    its retries, and the next job is dequeued: RQ would start it, fail it on every retry with a traceback.
    """

    def __init__(self, name: str, connection: Redis, **kwargs):
        kwargs.setdefault("serializer", SERIALIZER)
        super().__init__(name, connection=connection, **kwargs)

    @classmethod
    def dequeue_any(cls, queues, timeout, connection, job_class=None, serializer=None, death_penalty_class=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for queue in queues:
                moved = rqcompat.move_to_intermediate(cls, connection, queue.key)
                if moved is not None:
                    fetched = rqcompat.fetch_dequeued(
                        cls, connection, *moved, job_class=job_class, serializer=serializer,
                        death_penalty_class=death_penalty_class)
                    if fetched is not None:
                        if _readable(fetched[0]):
                            return fetched
                        _fail_unreadable(connection, *fetched)
                    break  # the job hash is gone, or unreadable; look again from the top
            else:
                if deadline is None:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DequeueTimeout(timeout, [q.key for q in queues])
                # Block on the highest-priority queue only; the others are looked at between waits.
                _wait_for_push(connection, queues[0].key, min(BATCH_POLL_S, remaining))


def _readable(job: Job) -> bool:
    """Whether `job` is one this version runs: JSON data naming one of JOB_NAMES."""
    try:
        return job.func_name in JOB_NAMES  # deserializes the job's data (function, arguments)
    except DeserializationError:
        return False


def _fail_unreadable(connection: Redis, job: Job, queue: Queue) -> None:
    """Fail a dequeued job this version cannot run (pickled data, or a function an older version named) for
    good: off the intermediate list, into the failed registry (with a failure result saying why), no retries."""
    reason = ("the job was queued by an older car-backend version (its data is not JSON, or it names a function "
              "this version does not have) and cannot run; submit it again")
    try:
        named = ascii(job.func_name)[:200]
    except DeserializationError:
        named = "unreadable data"
    log.error("job %s on queue %s (%s) is not one of this version's jobs (queued by an older version of "
              "car-backend, or by anything else with write access to Redis): not run, moved to the failed "
              "registry; a job of car-backend must be resubmitted (a /predict of its task submits a new job, a new "
              "annotation a new review)", job.id, queue.name, named)
    ttl = job.failure_ttl if job.failure_ttl is not None else FAILURE_TTL
    with connection.pipeline() as pipe:
        pipe.lrem(rqcompat.intermediate_key(queue), 1, job.id)
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        rqcompat.record_failure(job, queue, ttl, reason, pipe)
        pipe.execute()


def _wait_for_push(connection: Redis, key: str, seconds: float) -> None:
    """Block up to `seconds` until `key` has an element, leaving it there (BLMOVE onto itself)."""
    connection.blmove(key, key, seconds, "LEFT", "LEFT")


class JobQueue:
    """Submits jobs (deduplicated by key) and reports on them.

    `redis` is the process's client (passed in), `locks` the JobLocks on it. Methods raise RedisError when
    Redis is unavailable.
    """

    def __init__(self, settings: Settings, redis: Redis, locks: JobLocks):
        self.settings = settings
        self.redis = redis
        self.locks = locks
        interactive, batch = queue_names(settings)
        self.interactive = CarQueue(interactive, connection=redis)
        self.batch = CarQueue(batch, connection=redis)

    def submit(self, spec: JobSpec, interactive: bool = False) -> tuple[str, bool]:
        """(RQ job id, whether a new job was created) for `spec`'s key; an existing live job is reused (and
        promoted to the interactive queue when `interactive` and it is still queued as batch work)."""
        key = spec.key
        lock = self.locks.key(key)
        queue = self.interactive if interactive else self.batch
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(lock)
                    current = pipe.get(lock)
                    if current is not None:
                        current = current.decode()
                        status = pipe.hget(Job.key_for(current), "status")
                        if status is not None and JobStatus(status.decode()) in LIVE:
                            if interactive:
                                self.promote([current])
                            return current, False
                    job_id = f"car-{key[:24]}-{uuid.uuid4().hex[:8]}"
                    pipe.multi()
                    pipe.set(lock, job_id, ex=self.locks.ttl)
                    queue.enqueue_call(JobName.SEGMENT.value, args=(spec.to_dict(),), job_id=job_id,
                                       description=f"segment {key[:12]}", pipeline=pipe,
                                       **self._job_options(self.settings.job_timeout))
                    pipe.execute()
                    return job_id, True
                except WatchError:
                    continue

    def submit_many(self, specs: list[JobSpec], interactive: bool = False,
                    deadline: float | None = None) -> list[tuple[str, bool]]:
        """`submit` for each spec (distinct keys), SUBMIT_CHUNK keys per transaction; same answers, in order.
        With `deadline` (monotonic), no chunk starts after it: the answers then cover a prefix of `specs`."""
        out: list[tuple[str, bool]] = []
        for start in range(0, len(specs), SUBMIT_CHUNK):
            if deadline is not None and time.monotonic() >= deadline:
                break
            out.extend(self._submit_chunk(specs[start:start + SUBMIT_CHUNK], interactive))
        return out

    def _submit_chunk(self, specs: list[JobSpec], interactive: bool) -> list[tuple[str, bool]]:
        keys = [spec.key for spec in specs]
        locks = [self.locks.key(k) for k in keys]
        queue = self.interactive if interactive else self.batch
        options = self._job_options(self.settings.job_timeout)
        for _ in range(SUBMIT_ATTEMPTS):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(*locks)
                    current = [c.decode() if c is not None else None for c in pipe.mget(locks)]
                    # Job statuses through the other connection: the WATCH guards the locks, as in `submit`.
                    named = [c for c in current if c is not None]
                    status_of = dict(zip(named, self.statuses(named), strict=True))
                    live = [c is not None and status_of[c] in LIVE for c in current]
                    out = []
                    pipe.multi()
                    for spec, key, lock, job_id, alive in zip(specs, keys, locks, current, live, strict=True):
                        if alive:
                            out.append((job_id, False))
                            continue
                        job_id = f"car-{key[:24]}-{uuid.uuid4().hex[:8]}"
                        pipe.set(lock, job_id, ex=self.locks.ttl)
                        queue.enqueue_call(JobName.SEGMENT.value, args=(spec.to_dict(),), job_id=job_id,
                                           description=f"segment {key[:12]}", pipeline=pipe, **options)
                        out.append((job_id, True))
                    pipe.execute()
                except WatchError:
                    continue
            if interactive:
                self.promote([job_id for job_id, created in out if not created])
            return out
        return [self.submit(spec, interactive) for spec in specs]

    def promote(self, job_ids: list[str]) -> int:
        """Move those of `job_ids` still queued on the batch queue to the interactive one (behind the
        interactive jobs already there); how many moved. Jobs running or gone are left alone."""
        if not job_ids:
            return 0
        keys = (self.batch.key, self.interactive.key)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.eval(_PROMOTE, 4, *keys, Job.key_for(job_id), rqcompat.QUEUES_KEY, job_id,
                          self.interactive.name)
            moved = sum(pipe.execute())
        if moved:
            log.info("moved %d queued batch job(s) to the interactive queue: a person is waiting for them", moved)
        return moved

    def submit_call(self, name: JobName, args: tuple, description: str, timeout: int | None = None) -> str:
        """Queue job `name` on the batch queue (review, calibration and training jobs); its RQ job id.
        `args` must be JSON values (dicts, lists, strings, numbers)."""
        job = self.batch.enqueue_call(name.value, args=args, description=description,
                                      **self._job_options(timeout or self.settings.job_timeout))
        return job.id

    def _job_options(self, timeout: int) -> dict:
        """RQ options every car job gets: its timeout, bounded retries, how long results and failures stay."""
        return {"timeout": timeout, "result_ttl": RQ_RESULT_TTL, "failure_ttl": FAILURE_TTL,
                "retry": Retry(max=self.settings.job_retries) if self.settings.job_retries else None}

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """RQ status of each job (None when the job is gone); one Redis round trip."""
        if not job_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            return [JobStatus(s.decode()) if s is not None else None for s in pipe.execute()]

    def failure(self, job_id: str) -> str:
        """The last line of a failed job's error, for logs and pending-entry reasons."""
        try:
            result = Job.fetch(job_id, connection=self.redis, serializer=SERIALIZER).latest_result()
        except NoSuchJobError:
            return "the job disappeared"
        except (DeserializationError, ValueError):  # a result an older version pickled (not JSON)
            return "the job failed"
        text = (getattr(result, "exc_string", None) or "").strip()
        return text.splitlines()[-1] if text else "the job failed"

    def depth(self) -> QueueDepth:
        """Jobs waiting per queue, running, and in the failed registries; one Redis round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in (self.interactive, self.batch):
                pipe.llen(queue.key)
            for queue in (self.interactive, self.batch):
                pipe.zcard(queue.started_job_registry.key)
            for queue in (self.interactive, self.batch):
                pipe.zcard(queue.failed_job_registry.key)
            wi, wb, si, sb, fi, fb = pipe.execute()
        return QueueDepth(interactive=wi, batch=wb, started=si + sb, failed=fi + fb)

    def live_workers(self, max_silence_s: float) -> int:
        """Workers on the batch queue (every `car-backend worker`, which serves both queues) that sent a
        heartbeat in the last `max_silence_s` seconds; interactive lanes are not counted (`live_lanes`)."""
        members = self.redis.smembers(rqcompat.queue_workers_key(self.batch.name))
        return self._alive({rqcompat.as_text(k) for k in members}, max_silence_s)

    def live_lanes(self, max_silence_s: float) -> int:
        """Interactive lanes (workers on the interactive queue only) that sent a heartbeat in the last
        `max_silence_s` seconds."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in (self.interactive, self.batch):
                pipe.smembers(rqcompat.queue_workers_key(queue.name))
            interactive, batch = pipe.execute()
        return self._alive({rqcompat.as_text(k) for k in interactive - batch}, max_silence_s)

    def _alive(self, keys: set[str], max_silence_s: float) -> int:
        """How many of the workers' hashes `keys` have a heartbeat in the last `max_silence_s` seconds."""
        if not keys:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, "last_heartbeat", "death")
            beats = pipe.execute()
        now = datetime.now(timezone.utc)
        alive = 0
        for last, death in beats:
            if last is not None and death is None:
                if (now - rqcompat.beat_time(last)).total_seconds() <= max_silence_s:
                    alive += 1
        return alive
