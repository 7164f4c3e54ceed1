"""The service's shared pieces for one process: Redis (real or embedded), the stores, the job queue.

Built once per process and passed to everything that needs them. With REDIS_URL unset, the process also
runs the embedded worker thread, so `serve` and `prelabel --project` work alone with the same queue code as
a deployment with separate workers.
"""

from __future__ import annotations

import logging

from car_backend.queue.connection import connect
from car_backend.queue.jobqueue import JobQueue, make_store
from car_backend.queue.worker import WORKER_TTL_S, EmbeddedWorkerThread
from car_backend.review.report import project_report
from car_backend.review.store import ReviewStore
from car_backend.settings import Settings

log = logging.getLogger(__name__)


class Backend:
    """One process's Redis clients, stores and queue, and the embedded worker when REDIS_URL is unset.

    `store`, `queue`, `review` use the server client (fast-failing); `snapshot` reads through the probe
    client, which gives up within about half a second. Raises RedisError / OSError when the embedded Redis
    cannot start. `close()` stops the embedded worker and Redis.
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
        self._embedded = EmbeddedWorkerThread(settings, self.connection).start() \
            if self.connection.embedded is not None else None

    @property
    def mode(self) -> str:
        return "embedded" if self._embedded is not None else "redis"

    def snapshot(self) -> dict:
        """Queue depths, live workers and worker statistics, read through the fast-failing probe client."""
        return {
            "depth": self._probe_queue.depth(),
            "workers": self._probe_queue.live_workers(max_silence_s=WORKER_TTL_S + 5),
            "stats": self._probe_store.stats(),
            "review": [project_report(self._probe_review, p) for p in self._probe_review.projects()],
        }

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        self.probe.close()
        self.connection.close()
