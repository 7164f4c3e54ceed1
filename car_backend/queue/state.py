"""The Redis state of one process, built once on one client and passed to whoever needs it."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from car_backend.pipeline.compute import failure_conditions
from car_backend.queue.ledger import DeliveryLedger
from car_backend.queue.projects import ProjectRegistry
from car_backend.queue.results import JobLocks, ResultCache
from car_backend.queue.stats import Stats
from car_backend.settings import Settings


def lock_ttl(settings: Settings) -> int:
    """How long a dedup lock may outlive a job that never cleans it up: every attempt, plus margin."""
    return settings.job_timeout * (settings.job_retries + 1) + 300


@dataclass(frozen=True)
class RedisState:
    """The owners of every `car:` key but the review's and the text cache's, on one client (`redis`)."""

    redis: Redis
    results: ResultCache
    locks: JobLocks
    ledger: DeliveryLedger
    stats: Stats
    projects: ProjectRegistry

    @classmethod
    def on(cls, redis: Redis, settings: Settings) -> RedisState:
        return cls(redis=redis,
                   results=ResultCache(redis, settings.result_ttl, settings.pending_ttl, failure_conditions(settings)),
                   locks=JobLocks(redis, lock_ttl(settings)),
                   ledger=DeliveryLedger(redis, settings.late_ttl, settings.result_ttl),
                   stats=Stats(redis),
                   projects=ProjectRegistry(redis))
