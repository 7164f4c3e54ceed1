"""The service's shared pieces for one process: Redis (real or embedded), the store, the job queue.

With REDIS_URL unset, the process also runs the embedded worker thread, so `serve` and
`prelabel --project` work alone with the same queue code as a deployment with separate workers.
"""

from __future__ import annotations

import logging

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from car_backend.jobqueue import JobQueue, connect, make_store
from car_backend.report import project_report
from car_backend.review import ReviewStore
from car_backend.settings import Settings
from car_backend.worker import WORKER_TTL_S, EmbeddedWorkerThread

log = logging.getLogger(__name__)


class Backend:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.connection = connect(settings)
        self.redis = self.connection.redis
        # /health and /metrics must answer within Label Studio's 1 s even when Redis is unreachable.
        self.probe = Redis.from_url(self.connection.url, socket_connect_timeout=0.25, socket_timeout=0.5,
                                    retry=Retry(NoBackoff(), 0))
        self.store = make_store(self.redis, settings)
        self.queue = JobQueue(settings, self.redis, self.store)
        self._probe_store = make_store(self.probe, settings)
        self._probe_queue = JobQueue(settings, self.probe, self._probe_store)
        self._probe_review = ReviewStore(self.probe, settings.result_ttl)
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
