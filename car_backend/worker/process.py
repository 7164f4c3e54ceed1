"""`car-backend worker`: an RQ worker that runs jobs in its own process, with the engine loaded once.

No fork per job (CUDA does not survive fork): `CarWorker` is RQ's SimpleWorker plus what it lacks for
long GPU jobs. RQ's SimpleWorker refreshes no heartbeat while a job runs, so its started-registry entry
must outlive the whole job timeout, and a worker killed mid-job would strand the job for that long. Here a
thread renews the heartbeat every few seconds with a short TTL, and maintenance runs often, so a job of a
killed worker (SIGKILL, lost machine) is requeued by another worker within about
HEARTBEAT_TTL_S + MAINTENANCE_INTERVAL_S seconds. That counts as one of the job's CAR_JOB_RETRIES.

SIGTERM (or Ctrl+C) is a warm stop: the current job finishes, then the worker exits; a second one is a
cold stop: the job is interrupted and requeued through its retries.

The interactive lane (CAR_INTERACTIVE_LANE): beside its own RQ worker, which serves the interactive queue
first and then the batch queue, a worker process starts `car-backend worker --lane`, a second worker on the
same device that listens to the interactive queue only. A job an annotator waits for then starts at once,
even while a batch job runs (RQ cannot interrupt a running job). The lane loads the models again on its
first job; its worker process is named `<worker>-interactive`, it writes no late deliveries (the batch
worker does: a Label Studio outage must not hold up annotators), and `Lane` restarts it when it dies and
stops it with its worker. The batch worker lowers its own CPU priority (BATCH_NICE) once the lane runs, so
on CPU an interactive job takes the cores it needs while a batch job runs; both keep CAR_THREADS threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from redis import Redis, RedisError
from rq.exceptions import StopRequested
from rq.worker import SimpleWorker, WorkerStatus

from car_backend.queue import rqcompat
from car_backend.queue.connection import redis_client
from car_backend.queue.jobqueue import SERIALIZER, WORKER_TTL_S, CarQueue, queue_names
from car_backend.settings import Settings
from car_backend.worker.context import NO_WRITES, WorkerContext
from car_backend.worker.lanes import LANE_SUFFIX
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
LANE_MIN_MEMORY = 8 * 2**30  # CAR_INTERACTIVE_LANE=auto runs a lane on hosts with this much memory or more
BATCH_NICE = 10  # CPU priority the batch worker gives up beside its lane (CFS: ~10% of a core it shares)
LANE_RESTART_MAX_S = 60.0  # a lane that keeps dying is started again at most this far apart
LANE_STABLE_S = 60.0  # a lane that ran this long starts again after RESTART_DELAY_S, not its last backoff


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
                context: WorkerContext | None = None, interactive_only: bool = False) -> CarWorker:
    """A worker on the interactive and batch queues (`interactive_only`: the interactive one, a lane);
    `context`: the process's WorkerContext, whose deliverer the maintenance uses (none: no deliveries in
    maintenance)."""
    names = queue_names(settings)
    queues = [CarQueue(q, connection=redis) for q in (names[:1] if interactive_only else names)]
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


def host_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower (a container);
    None when unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
        break
    return total


def lane_wanted(settings: Settings, burst: bool, memory: int | None) -> tuple[bool, str]:
    """(whether a worker runs an interactive lane beside it, why) for CAR_INTERACTIVE_LANE; `memory`: the
    host's (`host_memory()`). A burst worker (it exits when the queues are empty) never does."""
    if burst:
        return False, "a --burst worker runs no interactive lane"
    if settings.interactive_lane != "auto":
        return settings.interactive_lane == "on", f"CAR_INTERACTIVE_LANE={settings.interactive_lane}"
    if memory is not None and memory < LANE_MIN_MEMORY:
        return False, (f"CAR_INTERACTIVE_LANE=auto and this host has {memory / 2**30:.1f} GiB of memory (under "
                       f"{LANE_MIN_MEMORY // 2**30} GiB): interactive jobs wait for the running batch job; set "
                       "CAR_INTERACTIVE_LANE=on to run one anyway")
    return True, "CAR_INTERACTIVE_LANE=auto"


class Lane:
    """The interactive lane of the worker `name` (this process): a `car-backend worker --lane` child process
    named `name` + LANE_SUFFIX (+ `-<n>` when started again), on the same settings (this process's
    environment), started again when it exits unless `stop()` was called (after RESTART_DELAY_S, doubling up
    to LANE_RESTART_MAX_S while it keeps dying). It runs in a session of its own, so a Ctrl+C in a terminal
    reaches only this worker, which stops it; it watches this process (`--parent-pid`) and exits when it is
    gone (killed)."""

    def __init__(self, name: str):
        self.name = name + LANE_SUFFIX
        self._parent = os.getpid()
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="car-lane", daemon=True)

    def start(self) -> Lane:
        """Start the lane and its supervising thread. Call it before the worker lowers its priority: the lane
        is forked from that thread and keeps its priority."""
        self._thread.start()
        return self

    def _supervise(self) -> None:
        delay, starts = RESTART_DELAY_S, 0
        while not self._stopping.is_set():
            started = time.monotonic()
            # A lane started again takes a new name: RQ refuses one whose dead owner's registration lives on.
            name = self.name if starts == 0 else f"{self.name}-{starts}"
            starts += 1
            args = [sys.executable, "-m", "car_backend.cli", "worker", "--lane", "--name", name,
                    "--parent-pid", str(self._parent)]
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as exc:
                    log.error("could not start the interactive lane %s: %s", name, exc)
                    self._proc = None
                proc = self._proc
            if proc is not None:
                log.info("interactive lane %s started (process %d)", name, proc.pid)
                code = proc.wait()
                if self._stopping.is_set():
                    return
                log.warning("interactive lane %s exited (%s); starting it again in %.0f s", name, code, delay)
            if time.monotonic() - started >= LANE_STABLE_S:
                delay = RESTART_DELAY_S
            if self._stopping.wait(delay):
                return
            delay = min(LANE_RESTART_MAX_S, delay * 2)

    def stop(self, timeout: float = 10.0) -> None:
        """Warm-stop the lane (SIGTERM: its current job finishes), SIGKILL after `timeout` seconds; no restart."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("interactive lane %d did not stop within %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait(10)


def main(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.redis_url:
        log.error("car-backend worker needs REDIS_URL (the queue's Redis); without it, `car-backend serve` "
                  "runs jobs on its own embedded worker process")
        return 2
    if getattr(args, "parent_pid", None):
        _exit_with(args.parent_pid)
    lane_process = bool(getattr(args, "lane", False))
    if not settings.can_write_predictions and not lane_process:  # a lane never writes: its worker says it
        log.warning("worker: %s", NO_WRITES)
    redis = redis_client(settings.redis_url, "worker")
    base_name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    # A lane writes no late deliveries (its batch worker does): a slow Label Studio must not hold it up.
    context = WorkerContext(settings, redis, name=base_name, deliver=not lane_process)
    install(context)
    lane = None
    if not lane_process:
        wanted, why = lane_wanted(settings, args.burst, host_memory())
        if wanted:
            lane = Lane(base_name).start()
            os.nice(BATCH_NICE)  # this thread's, inherited by the threads jobs start (torch's included)
            log.info("worker %s: interactive jobs also run on its lane %s (%s)", base_name, lane.name, why)
        else:
            log.info("worker %s: no interactive lane (%s)", base_name, why)
    generation = 0
    try:
        while True:
            name = base_name if generation == 0 else f"{base_name}-{generation}"
            worker = None
            try:
                worker = make_worker(CarWorker, settings, redis, name, context, interactive_only=lane_process)
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
    finally:
        if lane is not None:
            lane.stop()
