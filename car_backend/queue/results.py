"""The result cache and the per-key job locks.

    car:result:<K>   JSON JobResult of job key K: the cache every reader of results goes through
    car:job:<K>      id of the RQ job computing K (dedup lock; the job deletes it when done)

A job key K covers everything a result depends on (the model version and engine fingerprint included), so
nothing here is invalidated by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

from redis import Redis

from car_backend.pipeline.spec import JobResult
from car_backend.queue.keys import KeyFamily

COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class ResultCache:
    """`car:result:<K>`. `ttl`: seconds a result lives (CAR_RESULT_TTL); `pending_ttl`: seconds a pending
    failure lives (CAR_PENDING_TTL, at most `ttl`); `conditions`: this process's
    `pipeline.compute.failure_conditions`, without which a cached pending failure is not believed. Methods
    raise RedisError when Redis is unavailable."""

    RESULT = KeyFamily("car:result:<K>", "ResultCache", "CAR_RESULT_TTL; a pending failure CAR_PENDING_TTL")

    def __init__(self, redis: Redis, ttl: int, pending_ttl: int = 60, conditions: str = ""):
        self.redis = redis
        self.ttl = max(1, ttl)
        self.pending_ttl = max(1, min(pending_ttl, self.ttl))
        self.conditions = conditions

    def get_many(self, keys: Sequence[str]) -> list[JobResult | None]:
        """The cached result of each key, None where there is none; a pending failure recorded under other
        settings (`conditions`) counts as none, so a changed setting recomputes."""
        if not keys:
            return []
        raw = self.redis.mget([self.RESULT.key(k) for k in keys])
        found = [JobResult.from_json(r) if r is not None else None for r in raw]
        return [None if r is not None and r.pending and r.conditions != self.conditions else r for r in found]

    def put(self, key: str, result: JobResult) -> None:
        ttl = self.pending_ttl if result.pending else self.ttl
        self.redis.set(self.RESULT.key(key), result.to_json(), ex=ttl)


class JobLocks:
    """`car:job:<K>`: which RQ job computes key K. Written by `queue.jobqueue.JobQueue` in the transaction
    that queues the job; `ttl` (lock_ttl) bounds a lock whose job never cleaned up."""

    LOCK = KeyFamily("car:job:<K>", "JobLocks",
                     "lock_ttl = CAR_JOB_TIMEOUT x (CAR_JOB_RETRIES + 1) + 300 s; deleted by its job")

    def __init__(self, redis: Redis, ttl: int):
        self.redis = redis
        self.ttl = ttl

    def key(self, key: str) -> str:
        return self.LOCK.key(key)

    def job_ids(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        raw = self.redis.mget([self.key(k) for k in keys])
        return [r.decode() if r is not None else None for r in raw]

    def release(self, key: str, job_id: str) -> None:
        """Delete the lock if it still names `job_id` (a newer job's lock stays)."""
        self.redis.eval(COMPARE_AND_DELETE, 1, self.key(key), job_id)
