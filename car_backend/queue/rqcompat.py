"""Every use of RQ internals (private names, undocumented helpers and keys, its worker's hooks), in one place.

The rest of car_backend uses RQ's public API (Queue.enqueue_call, Job.fetch, registries, SimpleWorker) and the
names below only through this module. None of them is promised stable across RQ releases: each says which
releases have it, read in the sources of rq 2.0.0, 2.1.0, 2.2.0, 2.3.3, 2.4.1, 2.5.0, 2.6.0, 2.6.1, 2.7.0,
2.8.0, 2.9.1, 2.10.0, 2.11.0, 2.12.0 and 3.0.0, and why it is used. SUPPORTED is pyproject.toml's pin
(Label Studio 1.23 pins rq 2.6); tests/queue/test_rqcompat.py checks the installed rq against it, INTERNALS
and SIGNATURES.

RQ 3.0 changed two worker methods: `perform_job` and `maintain_heartbeats` take the job's Execution, where
2.x reads it from `worker.execution` (set by `prepare_execution`); `perform` and `maintain_heartbeats` here
call either form.
"""

from __future__ import annotations

import inspect
from datetime import datetime

from redis import Redis
from redis.client import Pipeline
from rq import utils, worker_registration
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.queue import Queue
from rq.results import Result
from rq.worker import SimpleWorker

SUPPORTED = ">=2.6,<3.1"

# (owner, name) of every internal used here or overridden by CarQueue / CarWorker: all in rq 2.0 to 3.0.
# Worker methods are looked up on SimpleWorker, CarWorker's base: rq up to 2.6 defines some of them on
# Worker, not BaseWorker.
INTERNALS: tuple[tuple[object, str], ...] = (
    (Queue, "lmove"), (Queue, "from_queue_key"), (Queue, "intermediate_queue_key"),
    (Queue, "redis_queues_keys"), (Result, "create_failure"), (utils, "as_text"), (utils, "utcparse"),
    (worker_registration, "register"), (worker_registration, "WORKERS_BY_QUEUE_KEY"),
    (worker_registration, "REDIS_WORKER_KEYS"),
    *((SimpleWorker, name) for name in (
        "redis_worker_namespace_prefix", "max_connection_wait_time", "prepare_execution", "perform_job",
        "maintain_heartbeats", "set_state", "prepare_job_execution", "heartbeat", "get_heartbeat_ttl",
        "run_maintenance_tasks", "execute_job")),
)
# Attributes a worker sets in __init__ (not on the class): rq 2.0 to 3.0.
WORKER_INSTANCE_INTERNALS = ("_shutdown_requested_date",)
# Parameters the code passes by name or that CarQueue / CarWorker accept in an override: rq 2.0 to 3.0.
SIGNATURES: tuple[tuple[object, tuple[str, ...]], ...] = (
    (Queue.dequeue_any,
     ("queues", "timeout", "connection", "job_class", "serializer", "death_penalty_class")),
    (Queue.from_queue_key, ("queue_key", "connection", "job_class", "serializer", "death_penalty_class")),
    (Result.create_failure, ("job", "ttl", "exc_string", "pipeline")),
    (SimpleWorker.prepare_job_execution, ("job", "remove_from_intermediate_queue")),
    (SimpleWorker.heartbeat, ("timeout", "pipeline")),
)

# rq 3.0 passes the Execution to perform_job and maintain_heartbeats; 2.x keeps it on the worker.
_TAKES_EXECUTION = "execution" in inspect.signature(SimpleWorker.perform_job).parameters

# The set of all queue names, and per queue the set of its workers' keys: rq 2.0 to 3.0 (3.0 builds them
# from RQ_KEY_PREFIX, default "rq"). Read to register promoted jobs' queue and count live workers.
QUEUES_KEY: str = Queue.redis_queues_keys
WORKERS_KEY: str = worker_registration.REDIS_WORKER_KEYS
# A worker's hash is this prefix plus its name: rq 2.0 to 3.0. `car-backend worker --check` finds it by name.
WORKER_KEY_PREFIX: str = SimpleWorker.redis_worker_namespace_prefix


def queue_workers_key(queue_name: str) -> str:
    """The Redis set of the workers' keys on queue `queue_name` (WORKERS_BY_QUEUE_KEY, rq 2.0 to 3.0)."""
    return worker_registration.WORKERS_BY_QUEUE_KEY % queue_name


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (rq.utils.as_text, rq 2.0 to 3.0: how RQ itself decodes its keys)."""
    return utils.as_text(value)


def beat_time(value: bytes | str) -> datetime:
    """A worker's `last_heartbeat` field as an aware UTC datetime (rq.utils.utcparse, rq 2.0 to 3.0: the
    parser of the format RQ writes it in)."""
    return utils.utcparse(as_text(value))


def move_to_intermediate(queue_class: type[Queue], connection: Redis,
                         queue_key: str) -> tuple[str, str] | None:
    """LMOVE the first job id of `queue_key` onto that queue's intermediate list, without blocking:
    (queue key, job id), or None when the queue is empty.

    Queue.lmove (rq 2.0 to 3.0; RQ uses it only when a worker listens on one queue): a job of a worker killed
    between this move and the start of the job stays in the intermediate list, which RQ's maintenance
    requeues (IntermediateQueue.cleanup); BLPOP, RQ's dequeue for several queues, would lose it.
    """
    moved = queue_class.lmove(connection, queue_key, None)
    return None if moved is None else (as_text(moved[0]), as_text(moved[1]))


def fetch_dequeued(queue_class: type[Queue], connection: Redis, queue_key: str, job_id: str, job_class=None,
                   serializer=None, death_penalty_class=None) -> tuple[Job, Queue] | None:
    """(job, queue) for a job id just moved off `queue_key`, or None when its job hash is gone.

    What RQ's dequeue_any does after its pop (inline in rq 2.x, `Queue._fetch_dequeued_job` in 3.0 only),
    on public calls (Queue.from_queue_key, Job.fetch) so that both work. Other errors of the fetch pass
    through with `job_id` and `queue` attached, as RQ does for its error reports.
    """
    queue = queue_class.from_queue_key(queue_key, connection=connection, job_class=job_class,
                                       serializer=serializer, death_penalty_class=death_penalty_class)
    try:
        job = (job_class or queue_class.job_class).fetch(job_id, connection=connection, serializer=serializer)
    except NoSuchJobError:
        return None
    except Exception as exc:
        exc.job_id = job_id
        exc.queue = queue
        raise
    return job, queue


def intermediate_key(queue: Queue) -> str:
    """The Redis list `move_to_intermediate` parks `queue`'s jobs in (Queue.intermediate_queue_key, rq 2.0
    to 3.0)."""
    return queue.intermediate_queue_key


def record_failure(job: Job, queue: Queue, ttl: int, reason: str, pipeline: Pipeline) -> None:
    """Put `job` in `queue`'s failed registry with a failure result saying `reason`, in `pipeline`.

    Result.create_failure (rq 2.0 to 3.0; 2.5 added worker_name and 3.0 execution fields, both optional) is
    how RQ's worker records a failure: the job's latest_result() then says why.
    """
    queue.failed_job_registry.add(job, ttl=ttl, exc_string=reason, pipeline=pipeline)
    Result.create_failure(job, ttl, exc_string=reason, pipeline=pipeline)


def register(worker: SimpleWorker, pipeline: Pipeline | None) -> None:
    """Add `worker` to the registration sets (worker_registration.register, rq 2.0 to 3.0): RQ does so only
    when the worker starts, so a Redis that restarted empty would not list it again."""
    worker_registration.register(worker, pipeline)


def perform(worker: SimpleWorker, job: Job, queue: Queue, execution) -> None:
    """worker.perform_job for the Execution `execution` (from worker.prepare_execution, rq 2.0 to 3.0): a
    parameter in 3.0, read from `worker.execution` in 2.x. Used by CarWorker.execute_job, which runs the job
    itself to beat while it runs."""
    if _TAKES_EXECUTION:
        worker.perform_job(job, queue, execution)
    else:
        worker.perform_job(job, queue)


def maintain_heartbeats(worker: SimpleWorker, job: Job, execution) -> None:
    """Renew the heartbeats of `worker`, `execution` and `job` (worker.maintain_heartbeats, rq 2.0 to 3.0;
    the execution a parameter in 3.0 only), from CarWorker's heartbeat thread."""
    if _TAKES_EXECUTION:
        worker.maintain_heartbeats(job, execution)
    else:
        worker.maintain_heartbeats(job)


def stop_requested(worker: SimpleWorker) -> bool:
    """Whether `worker` got SIGTERM/SIGINT (its private `_shutdown_requested_date`, rq 2.0 to 3.0): its
    work loop then returned for good, not on a Redis error."""
    return worker._shutdown_requested_date is not None
