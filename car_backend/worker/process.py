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
import signal
import socket
import threading
import time

from redis import Redis, RedisError
from rq.exceptions import StopRequested
from rq.worker import SimpleWorker, WorkerStatus

from car_backend.queue import rqcompat
from car_backend.queue.connection import redis_client
from car_backend.queue.jobqueue import SERIALIZER, WORKER_TTL_S, CarQueue, queue_names
from car_backend.settings import Settings
from car_backend.worker.context import NO_WRITES, WorkerContext
from car_backend.worker.tasks import deliver_due, install

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 3
# Long enough for a C extension holding the GIL (dense CRF on a large image) not to starve the heartbeat
# thread into a false "abandoned": that would run the job twice (never deliver twice: claims decide).
HEARTBEAT_TTL_S = 30
MAINTENANCE_INTERVAL_S = 5
RESTART_DELAY_S = 2.0
PARENT_POLL_S = 1.0  # an embedded worker looks this often whether its server still runs
PARENT_GONE_GRACE_S = 10.0  # then lets its job finish this long at most


class CarWorker(SimpleWorker):
    """RQ's SimpleWorker with a heartbeat thread during jobs, JSON jobs only, and this process's
    `WorkerContext` (`context`, set by make_worker) for the maintenance's due deliveries."""

    queue_class = CarQueue
    max_connection_wait_time = 10.0  # while Redis is away, look for it at least this often (RQ: 60 s)
    context: WorkerContext | None = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("serializer", SERIALIZER)  # jobs are JSON; a pickle-reading worker would fail them all
        super().__init__(*args, **kwargs)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        """RQ's heartbeat, plus the registration sets: a Redis that restarted empty learns of this worker
        again at its next heartbeat (else /health and /predict would see no live worker)."""
        super().heartbeat(timeout, pipeline)
        rqcompat.register(self, pipeline)

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return HEARTBEAT_TTL_S

    def execute_job(self, job, queue):
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, done), name="car-heartbeat", daemon=True)
        beat.start()
        try:
            rqcompat.perform(self, job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job, execution, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_INTERVAL_S):
            try:
                rqcompat.maintain_heartbeats(self, job, execution)
            except RedisError as exc:
                log.warning("heartbeat for job %s failed: %s", job.id, exc)

    def run_maintenance_tasks(self):
        super().run_maintenance_tasks()
        if self.context is not None:
            deliver_due(self.context)  # writes into Label Studio waiting for their retry (queue.delivery)

    def prepare_job_execution(self, job, remove_from_intermediate_queue: bool = False) -> None:
        # CarQueue parks every dequeued job in its queue's intermediate list, whatever the queue count.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)


def make_worker(cls: type[CarWorker], settings: Settings, redis: Redis, name: str | None,
                context: WorkerContext | None = None) -> CarWorker:
    """A worker on the interactive and batch queues; `context`: the process's WorkerContext, whose deliverer
    the maintenance uses (none: no deliveries in maintenance)."""
    queues = [CarQueue(q, connection=redis) for q in queue_names(settings)]
    worker = cls(queues, name=name, connection=redis, queue_class=CarQueue, serializer=SERIALIZER,
                 log_job_description=False, worker_ttl=WORKER_TTL_S,
                 maintenance_interval=MAINTENANCE_INTERVAL_S, job_monitoring_interval=HEARTBEAT_INTERVAL_S)
    worker.context = context
    return worker


def _exit_with(parent: int) -> None:
    """Warm-stop this worker when process `parent` is gone (it was re-parented), then force the exit."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.warning("worker: the server (process %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(PARENT_GONE_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="car-parent-watch", daemon=True).start()


def main(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        log.error("car-backend worker needs REDIS_URL (the queue's Redis); without it, `car-backend serve` "
                  "runs jobs on its own embedded worker process")
        return 2
    if getattr(args, "parent_pid", None):
        _exit_with(args.parent_pid)
    if not settings.can_write_predictions:
        log.warning("worker: %s", NO_WRITES)
    redis = redis_client(settings.redis_url, "worker")
    base_name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    context = WorkerContext(settings, redis, name=base_name)
    install(context)
    generation = 0
    try:
        while True:
            name = base_name if generation == 0 else f"{base_name}-{generation}"
            worker = None
            try:
                worker = make_worker(CarWorker, settings, redis, name, context)
                worker.work(burst=args.burst, logging_level=None)
            except RedisError as exc:  # Redis vanished before or while the worker registered
                log.error("worker %s: Redis is unavailable (%s)", name, exc)
            if args.burst or (worker is not None and rqcompat.stop_requested(worker)):
                return 0
            # RQ's work loop gives up on Redis errors outside its dequeue wait; come back when Redis does.
            log.warning("worker %s stopped unexpectedly; starting again in %.0f s", name, RESTART_DELAY_S)
            time.sleep(RESTART_DELAY_S)
            generation += 1
    except StopRequested:  # SIGTERM while waiting to start again
        return 0
