"""`car-backend worker`: an RQ worker that runs jobs in its own process, with the engine loaded once.

No fork per job (CUDA does not survive fork): `CarWorker` is RQ's SimpleWorker plus what it lacks for
long GPU jobs. RQ's SimpleWorker refreshes no heartbeat while a job runs, so its started-registry entry
must outlive the whole job timeout, and a worker killed mid-job would strand the job for that long. Here a
thread renews the heartbeat every few seconds with a short TTL, and maintenance runs often, so a job of a
killed worker (SIGKILL, lost machine) is requeued by another worker within about
HEARTBEAT_TTL_S + MAINTENANCE_INTERVAL_S seconds. That counts as one of the job's CAR_JOB_RETRIES.

SIGTERM (or Ctrl+C) is a warm stop: the current job finishes, then the worker exits; a second one is a
cold stop: the job is interrupted and requeued through its retries.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time

from redis import Redis, RedisError
from rq.exceptions import StopRequested
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from car_backend.queue.connection import Connection, redis_client
from car_backend.queue.jobqueue import SERIALIZER, CarQueue, JobQueue, make_store, queue_names
from car_backend.queue.jobs import WorkerContext, deliver_due, install
from car_backend.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 3
# Long enough for a C extension holding the GIL (dense CRF on a large image) not to starve the heartbeat
# thread into a false "abandoned": that would run the job twice (never deliver twice: claims decide).
HEARTBEAT_TTL_S = 30
MAINTENANCE_INTERVAL_S = 5
WORKER_TTL_S = 20  # an idle worker's registration lives this long between heartbeats (RQ adds 60 s)
RESTART_DELAY_S = 2.0


class CarWorker(SimpleWorker):
    queue_class = CarQueue
    max_connection_wait_time = 10.0  # while Redis is away, look for it at least this often (RQ: 60 s)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("serializer", SERIALIZER)  # jobs are JSON; a pickle-reading worker would fail them all
        super().__init__(*args, **kwargs)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return HEARTBEAT_TTL_S

    def execute_job(self, job, queue):
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, done), name="car-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job, execution, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:
                log.warning("heartbeat for job %s failed: %s", job.id, exc)

    def run_maintenance_tasks(self):
        super().run_maintenance_tasks()
        deliver_due()  # writes into Label Studio waiting for their retry (queue.delivery)

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        # CarQueue parks every dequeued job in its queue's intermediate list, whatever the queue count.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)


class EmbeddedWorker(CarWorker):
    """The worker thread inside `car-backend serve` when REDIS_URL is unset."""

    death_penalty_class = TimerDeathPenalty  # SIGALRM only works in the main thread

    def _install_signal_handlers(self) -> None:
        """Signals belong to the server; `stop()` ends this worker."""


def make_worker(cls: type[CarWorker], settings: Settings, redis: Redis, name: str | None,
                stop_event: threading.Event | None = None) -> CarWorker:
    queue_class = CarQueue if stop_event is None else type("EmbeddedQueue", (CarQueue,), {"stop_event": stop_event})
    queues = [queue_class(q, connection=redis) for q in queue_names(settings)]
    worker = cls(queues, name=name, connection=redis, queue_class=queue_class, serializer=SERIALIZER,
                 log_job_description=False,
                 worker_ttl=WORKER_TTL_S,
                 maintenance_interval=MAINTENANCE_INTERVAL_S, job_monitoring_interval=HEARTBEAT_INTERVAL_S)
    return worker


def worker_context(settings: Settings, redis: Redis, name: str) -> WorkerContext:
    """The one WorkerContext of a worker process, on its one Redis client."""
    store = make_store(redis, settings)
    return WorkerContext(settings, store, JobQueue(settings, redis, store), name=name)


class EmbeddedWorkerThread:
    """Runs jobs in a thread of this process (`serve` and `prelabel --project` without REDIS_URL)."""

    def __init__(self, settings: Settings, connection: Connection):
        self._stop = threading.Event()
        redis = connection.client("worker")
        install(worker_context(settings, redis, name=f"embedded:{os.getpid()}"))
        self._worker = make_worker(EmbeddedWorker, settings, redis, name=f"embedded-{os.getpid()}-{id(self):x}",
                                   stop_event=self._stop)
        self._thread = threading.Thread(target=self._run, name="car-embedded-worker", daemon=True)

    def start(self) -> EmbeddedWorkerThread:
        self._thread.start()
        return self

    def _run(self) -> None:
        self._worker.work(logging_level=None)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


def main(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        log.error("car-backend worker needs REDIS_URL (the queue's Redis); without it, `car-backend serve` "
                  "runs jobs on its own in-process worker")
        return 2
    redis = redis_client(settings.redis_url, "worker")
    base_name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    install(worker_context(settings, redis, name=base_name))
    generation = 0
    try:
        while True:
            name = base_name if generation == 0 else f"{base_name}-{generation}"
            worker = None
            try:
                worker = make_worker(CarWorker, settings, redis, name)
                worker.work(burst=args.burst, logging_level=None)
            except RedisError as exc:  # Redis vanished before or while the worker registered
                log.error("worker %s: Redis is unavailable (%s)", name, exc)
            if args.burst or (worker is not None and worker._shutdown_requested_date is not None):
                return 0
            # RQ's work loop gives up on Redis errors outside its dequeue wait; come back when Redis does.
            log.warning("worker %s stopped unexpectedly; starting again in %.0f s", name, RESTART_DELAY_S)
            time.sleep(RESTART_DELAY_S)
            generation += 1
    except StopRequested:  # SIGTERM while waiting to start again
        return 0
