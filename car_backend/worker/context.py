"""What jobs run with in a worker process, built once per process (the composition root of `car-backend
worker`).

`WorkerContext` builds the Redis state (results, locks, ledger, stats, projects), the job queue, the review
store, the Label Studio client, the media fetcher, the deliverer and the review jobs' `ReviewRuntime` on the
process's one Redis client, and loads the engine and mask heads on first use. Jobs (car_backend.worker.tasks)
pass the library they call what it needs from it as typed arguments.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from redis import Redis

from car_backend.labelstudio.client import LabelStudioClient
from car_backend.labelstudio.media import MediaFetcher
from car_backend.queue.delivery import Deliverer
from car_backend.queue.jobqueue import JobQueue
from car_backend.queue.state import RedisState
from car_backend.queue.textcache import RedisTextCache
from car_backend.review.runtime import ReviewRuntime
from car_backend.review.store import ReviewStore
from car_backend.settings import Settings

if TYPE_CHECKING:  # torch: imported only where jobs run
    from car_backend.engine.head import MaskHead
    from car_backend.engine.segmenter import Segmenter

log = logging.getLogger(__name__)

# What a worker without a deliverer says at start and in `car-backend worker --check`.
NO_WRITES = ("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not both set: this worker cannot write late "
             "predictions into Label Studio; it leaves them staged for a worker that has both (none lost; "
             "set both here to write them from this worker too)")


class WorkerContext:
    """Everything jobs use in one worker process, on its one Redis client `redis`.

    `settings`: the worker's settings; `name`: written into the delivery claims and locks this worker takes.
    `deliverer` and `client` are None without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY; `deliverer` is None
    too with `deliver` False (an interactive lane: what its jobs stage is written by a batch worker). The
    engine loads on first use of `segmenter()` (raises ModelSpecError / ModelLoadError then).
    """

    def __init__(self, settings: Settings, redis: Redis, name: str | None = None, deliver: bool = True):
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.state = RedisState.on(redis, settings)
        self.queue = JobQueue(settings, redis, self.state.locks)
        self.review = ReviewStore(redis)
        self.fetcher = MediaFetcher(settings)
        self.client = LabelStudioClient(settings, settings.ls_timeout) if settings.can_write_predictions else None
        self.deliverer = Deliverer(self.state.ledger, self.state.results, self.state.stats, self.client, settings,
                                   owner=self.name) if self.client is not None and deliver else None
        self._text_cache = RedisTextCache(redis, settings.text_cache_ttl) if settings.text_cache_ttl else None
        self._segmenter: Segmenter | None = None
        self._lock = threading.Lock()
        self._heads: dict[str, MaskHead | None] = {}  # JobSpec.head reference -> head, None for an unusable one
        self.review_runtime = ReviewRuntime(settings=settings, review=self.review, state=self.state,
                                            queue=self.queue, client=self.client, fetcher=self.fetcher,
                                            segmenter=self.segmenter, head=self.head, name=self.name)

    def segmenter(self) -> Segmenter:
        """The engine, loaded on the first call (CAR_THREADS applied)."""
        with self._lock:
            if self._segmenter is None:
                import torch  # imported only where jobs run

                from car_backend.engine import Segmenter

                if self.settings.threads:
                    torch.set_num_threads(self.settings.threads)
                self._segmenter = Segmenter(self.settings.engine_config(), text_cache=self._text_cache)
            return self._segmenter

    def head(self, reference: str) -> MaskHead | None:
        """The mask head a `JobSpec.head` reference (the sha256 of its weights) names, loaded once per worker;
        None for "" and for weights that are gone, corrupt, not the ones referenced or trained on another
        proposal CLIP (logged once, the job runs plain CaR). Raises RedisError when Redis is down."""
        if not reference:
            return None
        with self._lock:
            if reference in self._heads:
                return self._heads[reference]
        from car_backend.engine.head import HeadError, head_from_bytes  # torch, only where jobs run

        blob = self.review.head_blob(reference)
        head = None
        if blob is None:
            log.warning("mask head %s is gone from Redis: jobs that name it run without it", reference[:12])
        elif hashlib.sha256(blob).hexdigest() != reference:
            log.warning("mask head %s does not hold the weights its jobs name: ignored", reference[:12])
        else:
            try:
                head, _, _ = head_from_bytes(blob, identity=self.segmenter().proposal_clip.name)
            except HeadError as exc:
                log.warning("mask head %s ignored: %s", reference[:12], exc)
        with self._lock:
            self._heads[reference] = head
        return head
