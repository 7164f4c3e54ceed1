"""Counters that worker processes keep in Redis for /metrics (`car:stats`, a hash without TTL).

Each counter is `<family>:<outcome>`: a `CounterFamily` and the value of one of its outcome enums
(`JobOutcome`, `DeliveryOutcome`, `TextLookup`, or the review's `WebhookOutcome`), plus the job-duration
histogram (`seconds:sum`, `seconds:count`, `seconds:le:<bound>`). `Stats.read` returns them as
`WorkerCounters`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from redis import Redis
from redis.client import Pipeline

from car_backend.queue.keys import KeyFamily

# Job-duration histogram bounds (seconds), shared by the worker that records and /metrics that reads.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class CounterFamily(str, Enum):
    JOBS = "jobs"
    DELIVERIES = "deliveries"
    TEXT = "text"
    WEBHOOK = "webhook"


class JobOutcome(str, Enum):
    """How one job attempt ended: ok, failed (permanently: the image itself), error (raised, retried)."""

    OK = "ok"
    FAILED = "failed"
    ERROR = "error"


class DeliveryOutcome(str, Enum):
    """Late predictions: written (api), refused by the read-back check, dropped, abandoned after the window."""

    API = "api"
    REFUSED = "refused"
    DROPPED = "dropped"
    ABANDONED = "abandoned"


class TextLookup(str, Enum):
    HIT = "hit"
    MISS = "miss"


@dataclass(frozen=True)
class WorkerCounters:
    """What `car:stats` holds: counts per family and outcome value, and the job-duration histogram
    (`buckets`: bound -> jobs that took at most that long)."""

    counts: Mapping[tuple[CounterFamily, str], float] = field(default_factory=dict)
    seconds_sum: float = 0.0
    seconds_count: float = 0.0
    buckets: Mapping[float, float] = field(default_factory=dict)

    def get(self, family: CounterFamily, outcome: Enum) -> float:
        return self.counts.get((family, outcome.value), 0.0)


class Stats:
    """`car:stats`; `redis` passed in. Methods raise RedisError when Redis is unavailable."""

    STATS = KeyFamily("car:stats", "Stats", "no TTL")

    def __init__(self, redis: Redis):
        self.redis = redis

    def count(self, family: CounterFamily, outcome: Enum, n: int = 1) -> None:
        self.count_in(self.redis, family, outcome, n)

    def count_in(self, client: Redis | Pipeline, family: CounterFamily, outcome: Enum, n: int = 1) -> None:
        """`count` through `client`: the caller's pipeline, or the Redis client itself."""
        client.hincrby(self.STATS.key(), f"{family.value}:{outcome.value}", n)

    def record_job(self, outcome: JobOutcome, seconds: float) -> None:
        key = self.STATS.key()
        with self.redis.pipeline(transaction=False) as pipe:
            self.count_in(pipe, CounterFamily.JOBS, outcome)
            pipe.hincrbyfloat(key, "seconds:sum", seconds)
            pipe.hincrby(key, "seconds:count", 1)
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(key, f"seconds:le:{bound}", 1)
            pipe.execute()

    def read(self) -> WorkerCounters:
        counts: dict[tuple[CounterFamily, str], float] = {}
        buckets: dict[float, float] = {}
        seconds_sum = seconds_count = 0.0
        families = {f.value: f for f in CounterFamily}
        for raw_name, raw_value in self.redis.hgetall(self.STATS.key()).items():
            name, value = raw_name.decode(), float(raw_value)
            if name == "seconds:sum":
                seconds_sum = value
            elif name == "seconds:count":
                seconds_count = value
            elif name.startswith("seconds:le:"):
                buckets[float(name.removeprefix("seconds:le:"))] = value
            else:
                family, _, outcome = name.partition(":")
                if family in families:
                    counts[(families[family], outcome)] = value
        return WorkerCounters(counts, seconds_sum, seconds_count, buckets)
