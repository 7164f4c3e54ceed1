"""The service's shared pieces for one process: Redis (real or embedded), the stores, the job queue.

Built once per process and passed to everything that needs them. With REDIS_URL unset, the process also
starts the embedded worker: a `car-backend worker` child process on the embedded Redis (queue.worker
.EmbeddedWorkerProcess), so `serve` and `prelabel --project` work alone with the same queue code as a
deployment with separate workers, and a job holding the GIL never stalls the HTTP threads.
"""

from __future__ import annotations

import logging
import threading
import time

from car_backend.queue.connection import connect
from car_backend.queue.jobqueue import JobQueue, make_store
from car_backend.queue.worker import WORKER_TTL_S, EmbeddedWorkerProcess
from car_backend.review.report import project_report
from car_backend.review.store import ReviewStore
from car_backend.settings import Settings

log = logging.getLogger(__name__)

# /predict asks whether a worker is alive on every call; one answer serves the calls of this many seconds.
WORKERS_CACHE_S = 1.0


class Backend:
    """One process's Redis clients, stores and queue, and the embedded worker when REDIS_URL is unset.

    `store`, `queue`, `review` use the server client (fast-failing); `health`, `snapshot` and
    `review_reports` read through the probe client, which gives up within about half a second (they raise
    RedisError then). Raises RedisError / OSError when the embedded Redis cannot start. `close()` stops the
    embedded worker and Redis.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.connection = connect(settings)
        self.redis = self.connection.redis
        self.probe = self.connection.client("probe")
        self.store = make_store(self.redis, settings)
        self.queue = JobQueue(settings, self.redis, self.store)
        self.review = ReviewStore(self.redis)
        self._probe_store = make_store(self.probe, settings)
        self._probe_queue = JobQueue(settings, self.probe, self._probe_store)
        self._probe_review = ReviewStore(self.probe)
        self._workers_lock = threading.Lock()
        self._workers_seen: tuple[float, int] | None = None
        self._embedded = EmbeddedWorkerProcess(settings, self.connection.url).start() \
            if self.connection.embedded is not None else None

    @property
    def mode(self) -> str:
        return "embedded" if self._embedded is not None else "redis"

    def health(self) -> dict:
        """What /health reports, in a constant number of Redis calls (whatever the projects or results):
        {"depth": JobQueue.depth(), "workers": live workers, "warnings": [str, ...]}."""
        workers = self._probe_queue.live_workers(max_silence_s=WORKER_TTL_S + 5)
        warnings = []
        if self._embedded is not None and not self._embedded.alive():
            warnings.append(f"the embedded worker process exited ({self._embedded.exit_code()}); jobs wait until "
                            "the server is restarted")
        elif self._embedded is None and workers == 0:
            warnings.append("no live worker serves the queue: start `car-backend worker` with the same settings; "
                            "/predict answers every task pending until one runs")
        return {"depth": self._probe_queue.depth(), "workers": workers, "warnings": warnings}

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
        count = self.queue.live_workers(max_silence_s=WORKER_TTL_S + 5)
        with self._workers_lock:
            self._workers_seen = (now, count)
        return count > 0

    def snapshot(self) -> dict:
        """Queue depths, live workers and worker statistics, read through the fast-failing probe client."""
        return {
            "depth": self._probe_queue.depth(),
            "workers": self._probe_queue.live_workers(max_silence_s=WORKER_TTL_S + 5),
            "stats": self._probe_store.stats(),
        }

    def review_reports(self) -> list[dict]:
        """`car-backend report` of every project with review data (work grows with the corrected tasks:
        /metrics caches it, /health never calls it)."""
        return [project_report(self._probe_review, p) for p in self._probe_review.projects()]

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        self.probe.close()
        self.connection.close()
