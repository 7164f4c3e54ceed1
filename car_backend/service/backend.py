"""The service's shared pieces for one process: Redis (real or embedded), its state, the job queue, projects.

Built once per process and passed to everything that needs them. With REDIS_URL unset, the process also
starts the embedded worker: a `car-backend worker` child process on the embedded Redis
(service.embedded.EmbeddedWorkerProcess), so `serve` and `prelabel --project` work alone with the same queue
code as a deployment with separate workers, and a job holding the GIL never stalls the HTTP threads.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from car_backend.pipeline.identity import ProjectId
from car_backend.queue.connection import connect
from car_backend.queue.jobqueue import MAX_SILENCE_S, JobQueue, QueueDepth
from car_backend.queue.state import RedisState
from car_backend.queue.stats import WorkerCounters
from car_backend.review.report import ProjectReport, project_report
from car_backend.review.store import ReviewStore
from car_backend.service.embedded import EmbeddedWorkerProcess
from car_backend.service.projects import Projects
from car_backend.settings import Settings

log = logging.getLogger(__name__)

# /predict asks whether a worker is alive on every call; one answer serves the calls of this many seconds.
WORKERS_CACHE_S = 1.0
# An outbox due this long ago and still unwritten has no deliverer: every deliverer looks every few seconds.
OVERDUE_S = 60.0


@dataclass(frozen=True)
class Health:
    """What /health reports of the queue: depths, live workers (interactive lanes apart), and what is wrong
    (`warnings`)."""

    depth: QueueDepth
    workers: int
    warnings: list[str] = field(default_factory=list)
    overdue_outboxes: int = 0  # projects whose late predictions wait for a worker that can write them
    lanes: int = 0  # live interactive lanes (worker.process.Lane), not counted in `workers`


@dataclass(frozen=True)
class Snapshot:
    """What /metrics reads from Redis at each scrape: queue depths, live workers, worker counters."""

    depth: QueueDepth
    workers: int
    counters: WorkerCounters


class Backend:
    """One process's Redis clients, state, queue and projects, and the embedded worker when REDIS_URL is unset.

    `state`, `queue`, `review` and `projects` use the server client (fast-failing); `health`, `snapshot` and
    `review_reports` read through the probe client, which gives up within about half a second (they raise
    RedisError then). Raises RedisError / OSError when the embedded Redis cannot start. `close()` stops the
    embedded worker and Redis.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.connection = connect(settings)
        self.redis = self.connection.redis
        self.probe = self.connection.client("probe")
        self.state = RedisState.on(self.redis, settings)
        self.queue = JobQueue(settings, self.redis, self.state.locks)
        self.review = ReviewStore(self.redis)
        self.projects = Projects(settings, self.state.projects, self.review)
        self._probe_state = RedisState.on(self.probe, settings)
        self._probe_queue = JobQueue(settings, self.probe, self._probe_state.locks)
        self._probe_review = ReviewStore(self.probe)
        self._workers_lock = threading.Lock()
        self._workers_seen: tuple[float, int] | None = None
        self._embedded = EmbeddedWorkerProcess(settings, self.connection.url).start() \
            if self.connection.embedded is not None else None

    @property
    def mode(self) -> str:
        return "embedded" if self._embedded is not None else "redis"

    def health(self) -> Health:
        """What /health reports, in a constant number of Redis calls (whatever the projects or results)."""
        workers = self._probe_queue.live_workers(max_silence_s=MAX_SILENCE_S)
        warnings = []
        if self._embedded is not None and not self._embedded.alive():
            warnings.append(f"the embedded worker process exited ({self._embedded.exit_code()}); jobs wait until "
                            "the server is restarted")
        elif self._embedded is None and workers == 0:
            warnings.append("no live worker serves the queue: start `car-backend worker` with the same settings; "
                            "/predict answers every task pending until one runs")
        overdue = self._probe_state.ledger.overdue(time.time() - OVERDUE_S)
        if overdue:
            warnings.append(f"late predictions of {overdue} project(s) have waited over {OVERDUE_S:g} s to be "
                            "written into Label Studio: no live worker has LABEL_STUDIO_URL and "
                            "LABEL_STUDIO_API_KEY (workers without them compute and leave the writes to one that "
                            "has them; nothing is lost until CAR_LATE_TTL)")
        return Health(self._probe_queue.depth(), workers, warnings, overdue,
                      lanes=self._probe_queue.live_lanes(max_silence_s=MAX_SILENCE_S))

    def workers_available(self) -> bool:
        """Whether a worker can run jobs now: the embedded process is alive, or (REDIS_URL set) some worker
        sent a heartbeat recently. One Redis look per WORKERS_CACHE_S; raises RedisError."""
        if self._embedded is not None:
            return self._embedded.alive()  # registering takes seconds at start; jobs wait for it meanwhile
        now = time.monotonic()
        with self._workers_lock:
            seen = self._workers_seen
        if seen is not None and now - seen[0] < WORKERS_CACHE_S:
            return seen[1] > 0
        count = self.queue.live_workers(max_silence_s=MAX_SILENCE_S)
        with self._workers_lock:
            self._workers_seen = (now, count)
        return count > 0

    def snapshot(self) -> Snapshot:
        """Queue depths, live workers and worker counters, read through the fast-failing probe client."""
        return Snapshot(self._probe_queue.depth(), self._probe_queue.live_workers(max_silence_s=MAX_SILENCE_S),
                        self._probe_state.stats.read())

    def review_reports(self) -> list[ProjectReport]:
        """`car-backend report` of every project of this deployment's Label Studio with review data: per
        Label Studio id the newest project (a reset Label Studio's older one is left out, so /metrics has one
        series per id). Work grows with the corrected tasks: /metrics caches it, /health never calls it."""
        newest: dict[int, ProjectId] = {}
        for project in self._probe_review.projects():
            if project.instance == self.projects.instance and (
                    project.id not in newest or (project.created or 0) > (newest[project.id].created or 0)):
                newest[project.id] = project
        return [project_report(self._probe_review, p) for p in newest.values()]

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        self.probe.close()
        self.connection.close()
