"""Everything car-backend keeps in Redis besides RQ's own keys.

    car:result:<K>          JSON JobResult of job key K (TTL CAR_RESULT_TTL): the result cache
    car:job:<K>             id of the RQ job computing K (dedup lock; the job deletes it when done)
    car:late:<K>            set of LateRecords: tasks whose /predict gave up waiting on K, or that
                            `prelabel` enqueued; whoever sees all of a record's keys finished moves it into
                            the project's outbox; removed when Label Studio confirms the write
                            (TTL CAR_LATE_TTL, renewed when the job is submitted or starts)
    car:claim:<v>:<task>    who delivered this (task, model_version), v = 12 hex digits of the version's
                            sha1: SET NX decides between /predict answering with the result and a worker
                            posting it through the API (TTL CLAIM_TTL_S); "deliver:<w>" while a write is
                            in flight (taken over by the next holder of the project's lease),
                            "delivered:<w>" once Label Studio confirmed it
    car:delivered:<task>    JSON {version, keys}: the prediction this backend delivered for a task (by
                            /predict or through the API), so a later annotation can be compared with it
                            (TTL CAR_RESULT_TTL, like the results it points at)
    car:outbox:<p>          hash task -> LateRecord of project p whose jobs all finished: waiting to be written
                            through the API (removed when Label Studio confirms, see queue.delivery)
    car:outbox:due          sorted set of projects by the time (epoch s) their outbox is due to be written
    car:outbox:retry        hash project -> JSON {attempt, since}: the project's failed writes so far
    car:outbox:lease:<p>    the one deliverer writing project p's outbox now (TTL, renewed before each call)
    car:tasks:<p>           hash task -> JSON {version, keys, state, reason}: what /status reports
    car:project:<id>        JSON extra_params that /setup received for a project (/predict lacks them)
    car:stats               hash of worker-side counters and job-duration histogram buckets
    car:text:<m>:<t>        float32 bytes of the embedding of a text by a model (m: 12 hex digits of the
                            model identity's sha1, t: the text's sha1; TTL CAR_TEXT_CACHE_TTL), shared by
                            every worker so a vocabulary is encoded once per deployment

A job key K already covers the model version, so nothing here has to be invalidated by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis import Redis, RedisError

from car_backend.pipeline.spec import JobResult

log = logging.getLogger(__name__)

PREFIX = "car"
STATS_KEY = f"{PREFIX}:stats"
# A delivered (task, version) is not delivered again for this long. It covers every overlap Label Studio can
# produce (a /predict still in flight is cut at ML_TIMEOUT_PREDICT: 100 s by default, 300 s where deployments
# raise it for slow models) and lets a task come back soon after: Label Studio only asks again for a task
# that has no prediction of this version (deleted, or the answer was lost), and then it should get one.
CLAIM_TTL_S = 300
PROJECT_TTL_S = 90 * 24 * 3600
# Job-duration histogram bounds (seconds), shared by the worker that records and /metrics that reads.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_COMPARE_AND_PEXPIRE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
WRITING_PREFIX = "deliver:"  # claim owner of an API write in flight (or waiting for its retry)
DELIVERED_PREFIX = "delivered:"  # claim of a write Label Studio confirmed
OUTBOX_DUE_KEY = f"{PREFIX}:outbox:due"
OUTBOX_RETRY_KEY = f"{PREFIX}:outbox:retry"
# KEYS[1] claim; ARGV owner, ttl. Another deliverer's claim is taken over: only the lease holder calls this.
_CLAIM_FOR_DELIVERY = """
local current = redis.call('get', KEYS[1])
if not current then redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 'won' end
if current == ARGV[1] then redis.call('expire', KEYS[1], ARGV[2]) return 'won' end
if string.sub(current, 1, 10) == 'delivered:' then return 'delivered' end
if string.sub(current, 1, 8) == 'deliver:' then redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 'taken_over' end
return 'other'
"""


@dataclass(frozen=True)
class LateRecord:
    """A task to deliver through the API once every job key of it has a result.

    `project`: Label Studio's id of the project whose config planned the jobs; `images`: the task-data
    references that were predicted. Both are checked against the task read back from Label Studio before
    anything is written (queue.delivery).
    """

    task: int
    version: str
    keys: tuple[str, ...]
    project: int | None = None
    images: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"task": self.task, "version": self.version, "keys": list(self.keys),
                           "project": self.project, "images": list(self.images)},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> LateRecord:
        data = json.loads(raw)
        project = data.get("project")
        return cls(task=int(data["task"]), version=data["version"], keys=tuple(data["keys"]),
                   project=int(project) if project is not None else None, images=tuple(data.get("images") or ()))


@dataclass(frozen=True)
class Delivered:
    """The prediction delivered for a task: its model_version and the job keys whose results it holds."""

    version: str
    keys: tuple[str, ...]


class Store:
    """The service's Redis state besides RQ's and the review's (see the module docstring).

    `redis`: a client built once per process and passed in; `result_ttl`: seconds results and delivery
    marks live; `lock_ttl`: seconds a dedup lock may outlive its job; `late_ttl`: seconds a late record
    lives without news; `pending_ttl`: seconds a pending failure is cached; `conditions`: this process's
    `pipeline.compute.failure_conditions`, without which a cached pending failure is not believed. Methods
    raise RedisError when Redis is unavailable (RedisTextCache is the exception: its errors are misses).
    """

    def __init__(self, redis: Redis, result_ttl: int, lock_ttl: int, late_ttl: int = 7 * 24 * 3600,
                 pending_ttl: int = 60, conditions: str = ""):
        self.redis = redis
        self.result_ttl = max(1, result_ttl)
        self.lock_ttl = lock_ttl
        self.late_ttl = max(1, late_ttl)
        self.pending_ttl = max(1, min(pending_ttl, self.result_ttl))
        self.conditions = conditions

    # result cache
    def results(self, keys: Sequence[str]) -> list[JobResult | None]:
        """The cached result of each key, None where there is none; a pending failure recorded under other
        settings (`conditions`) counts as none, so a changed setting recomputes."""
        if not keys:
            return []
        raw = self.redis.mget([f"{PREFIX}:result:{k}" for k in keys])
        found = [JobResult.from_json(r) if r is not None else None for r in raw]
        return [None if r is not None and r.pending and r.conditions != self.conditions else r for r in found]

    def put_result(self, key: str, result: JobResult) -> None:
        ttl = self.pending_ttl if result.pending else self.result_ttl
        self.redis.set(f"{PREFIX}:result:{key}", result.to_json(), ex=ttl)

    # dedup lock
    @staticmethod
    def job_lock_key(key: str) -> str:
        return f"{PREFIX}:job:{key}"

    def release_job_lock(self, key: str, job_id: str) -> None:
        self.redis.eval(_COMPARE_AND_DELETE, 1, self.job_lock_key(key), job_id)

    def job_ids(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        raw = self.redis.mget([self.job_lock_key(k) for k in keys])
        return [r.decode() if r is not None else None for r in raw]

    # late deliveries
    def add_late(self, records: Iterable[LateRecord]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                for key in record.keys:
                    pipe.sadd(f"{PREFIX}:late:{key}", record.to_json())
                    pipe.expire(f"{PREFIX}:late:{key}", self.late_ttl)
            pipe.execute()

    def touch_late(self, key: str) -> None:
        """Renew the late records waiting on `key` (its job was submitted again, or starts)."""
        self.redis.expire(f"{PREFIX}:late:{key}", self.late_ttl)

    def late(self, key: str) -> list[LateRecord]:
        return [LateRecord.from_json(r) for r in self.redis.smembers(f"{PREFIX}:late:{key}")]

    def remove_late(self, record: LateRecord) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for key in record.keys:
                pipe.srem(f"{PREFIX}:late:{key}", record.to_json())
            pipe.execute()

    # delivery claims
    @staticmethod
    def claim_key(task_id: int, version: str) -> str:
        return f"{PREFIX}:claim:{hashlib.sha1(version.encode()).hexdigest()[:12]}:{task_id}"

    def claim(self, task_ids: Sequence[int], version: str, owner: str) -> list[bool]:
        """Try to become the one deliverer of each (task, version); True where this caller won."""
        if not task_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.set(self.claim_key(task_id, version), owner, nx=True, ex=CLAIM_TTL_S)
            return [bool(won) for won in pipe.execute()]

    def release_claim(self, task_id: int, version: str, owner: str) -> None:
        """Give a claim back after the delivery failed, so a later request or retry can deliver."""
        self.redis.eval(_COMPARE_AND_DELETE, 1, self.claim_key(task_id, version), owner)

    def claimed(self, task_ids: Sequence[int], version: str) -> list[bool]:
        if not task_ids:
            return []
        raw = self.redis.mget([self.claim_key(t, version) for t in task_ids])
        return [r is not None for r in raw]

    def claim_for_delivery(self, task_id: int, version: str, owner: str) -> str:
        """Take (task, version)'s claim for an API write by `owner`, who holds the project's outbox lease.

        "won": taken now; "taken_over": it was another deliverer's, whose write may or may not have reached
        Label Studio (the caller reads the task back before writing); "delivered": Label Studio confirmed a
        write; "other": /predict (or another process) delivered it.
        """
        return self.redis.eval(_CLAIM_FOR_DELIVERY, 1, self.claim_key(task_id, version), owner,
                               CLAIM_TTL_S).decode()

    def confirm_delivered(self, task_id: int, version: str, owner: str) -> None:
        """Label Studio confirmed `owner`'s write: the claim says so for CLAIM_TTL_S."""
        self.redis.set(self.claim_key(task_id, version), f"{DELIVERED_PREFIX}{owner}", ex=CLAIM_TTL_S)

    def delivery_states(self, task_ids: Sequence[int], version: str) -> list[str | None]:
        """Per task: None (unclaimed), "writing" (an API write in flight or waiting for a retry), "delivered"
        (confirmed by Label Studio, or answered by /predict)."""
        if not task_ids:
            return []
        raw = self.redis.mget([self.claim_key(t, version) for t in task_ids])
        return [None if r is None else "writing" if r.decode().startswith(WRITING_PREFIX) else "delivered"
                for r in raw]

    # the outbox: finished late tasks waiting to be written into Label Studio, per project
    def outbox_put(self, records: Iterable[LateRecord], due: float) -> None:
        """Queue `records` (their project must be set) for writing at `due` (epoch seconds), or when the
        project's outbox is due anyway (a project waiting for a retry keeps its time)."""
        with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.hset(f"{PREFIX}:outbox:{record.project}", str(record.task), record.to_json())
                pipe.expire(f"{PREFIX}:outbox:{record.project}", self.late_ttl)
                pipe.zadd(OUTBOX_DUE_KEY, {str(record.project): due}, nx=True)  # a retry's later time stays
            pipe.execute()

    def outbox(self, project: int, limit: int) -> list[LateRecord]:
        """Up to `limit` records of the project's outbox, lowest task ids first."""
        raw = self.redis.hgetall(f"{PREFIX}:outbox:{project}")
        records = sorted((LateRecord.from_json(v) for v in raw.values()), key=lambda r: r.task)
        return records[:limit]

    def outbox_size(self, project: int) -> int:
        return self.redis.hlen(f"{PREFIX}:outbox:{project}")

    def outbox_done(self, records: Sequence[LateRecord]) -> None:
        """Take `records` out of the outbox and their late records off their keys (delivered or dropped)."""
        if not records:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.hdel(f"{PREFIX}:outbox:{record.project}", str(record.task))
                for key in record.keys:
                    pipe.srem(f"{PREFIX}:late:{key}", record.to_json())
            pipe.execute()

    def due_projects(self, now: float, limit: int = 20) -> list[int]:
        return [int(p) for p in self.redis.zrangebyscore(OUTBOX_DUE_KEY, "-inf", now, start=0, num=limit)]

    def set_due(self, project: int, due: float | None) -> None:
        """The project's outbox is next due at `due`; None: it is empty (forget it and its retry state)."""
        if due is None:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(OUTBOX_DUE_KEY, str(project))
                pipe.hdel(OUTBOX_RETRY_KEY, str(project))
                pipe.execute()
        else:
            self.redis.zadd(OUTBOX_DUE_KEY, {str(project): due})

    def retry_state(self, project: int) -> tuple[int, float | None]:
        """(failed tries so far, epoch seconds of the first) of the project's current run of failed writes."""
        raw = self.redis.hget(OUTBOX_RETRY_KEY, str(project))
        if raw is None:
            return 0, None
        data = json.loads(raw)
        return int(data["attempt"]), float(data["since"])

    def put_retry_state(self, project: int, attempt: int, since: float) -> None:
        self.redis.hset(OUTBOX_RETRY_KEY, str(project), json.dumps({"attempt": attempt, "since": since}))

    def take_lease(self, project: int, owner: str, ttl: float) -> bool:
        return bool(self.redis.set(f"{PREFIX}:outbox:lease:{project}", owner, nx=True, px=int(ttl * 1000)))

    def renew_lease(self, project: int, owner: str, ttl: float) -> bool:
        """Extend the lease if `owner` still holds it; False when it was lost (expired, taken)."""
        return bool(self.redis.eval(_COMPARE_AND_PEXPIRE, 1, f"{PREFIX}:outbox:lease:{project}", owner,
                                    int(ttl * 1000)))

    def release_lease(self, project: int, owner: str) -> None:
        self.redis.eval(_COMPARE_AND_DELETE, 1, f"{PREFIX}:outbox:lease:{project}", owner)

    # per-project task states for /status
    def track(self, project: int, entries: Sequence[tuple[int, str, Sequence[str], str, str]]) -> None:
        """Record (task, version, keys, state, reason) for /status; states: "late" (to be written through the
        API), "delivered", "pending" (a failure a setting or outage may change), "empty" (a permanent failure
        answered as an empty prediction), "dropped" (not written: refused or given up)."""
        if not entries:
            return
        key = f"{PREFIX}:tasks:{project}"
        with self.redis.pipeline(transaction=False) as pipe:
            for task, version, keys, state, reason in entries:
                pipe.hset(key, str(task), json.dumps({"version": version, "keys": list(keys), "state": state,
                                                      "reason": reason}))
            pipe.expire(key, self.late_ttl)
            pipe.execute()

    def tracked(self, project: int, task: int | None = None) -> dict[int, dict]:
        key = f"{PREFIX}:tasks:{project}"
        if task is not None:
            raw = self.redis.hget(key, str(task))
            return {task: json.loads(raw)} if raw is not None else {}
        return {int(t): json.loads(v) for t, v in self.redis.hgetall(key).items()}

    def in_outbox(self, project: int, task_ids: Sequence[int]) -> list[bool]:
        if not task_ids:
            return []
        raw = self.redis.hmget(f"{PREFIX}:outbox:{project}", [str(t) for t in task_ids])
        return [r is not None for r in raw]

    # delivery marks: what was delivered for a task, for comparing a later annotation with it
    def record_delivered(self, deliveries: Sequence[tuple[int, str, Sequence[str]]]) -> None:
        """Remember (task, version, job keys) of predictions just delivered."""
        if not deliveries:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for task, version, keys in deliveries:
                pipe.set(f"{PREFIX}:delivered:{task}", json.dumps({"version": version, "keys": list(keys)}),
                         ex=self.result_ttl)
            pipe.execute()

    def delivered(self, task: int) -> Delivered | None:
        raw = self.redis.get(f"{PREFIX}:delivered:{task}")
        if raw is None:
            return None
        data = json.loads(raw)
        return Delivered(data["version"], tuple(data["keys"]))

    # per-project /setup parameters
    def save_project_params(self, project: str, extra_params: Any) -> None:
        self.redis.set(f"{PREFIX}:project:{project}", json.dumps(extra_params), ex=PROJECT_TTL_S)

    def project_params(self, project: str) -> Any:
        raw = self.redis.get(f"{PREFIX}:project:{project}")
        return json.loads(raw) if raw is not None else None

    # worker statistics (read by /metrics)
    def record_job(self, outcome: str, seconds: float) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(STATS_KEY, f"jobs:{outcome}", 1)
            pipe.hincrbyfloat(STATS_KEY, "seconds:sum", seconds)
            pipe.hincrby(STATS_KEY, "seconds:count", 1)
            for bound in DURATION_BUCKETS:
                if seconds <= bound:
                    pipe.hincrby(STATS_KEY, f"seconds:le:{bound}", 1)
            pipe.execute()

    def record_delivery(self, via: str, count: int = 1) -> None:
        self.redis.hincrby(STATS_KEY, f"deliveries:{via}", count)

    def stats(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(STATS_KEY).items()}


class RedisTextCache:
    """The engine's SharedTextCache on Redis. A Redis error is a miss (or a dropped write), never a failure."""

    def __init__(self, redis: Redis, ttl: int):
        self.redis = redis
        self.ttl = ttl

    @staticmethod
    def key(model: str, text: str) -> str:
        digest = hashlib.sha1
        return f"{PREFIX}:text:{digest(model.encode()).hexdigest()[:12]}:{digest(text.encode()).hexdigest()}"

    def get_many(self, model: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        try:
            raw = self.redis.mget([self.key(model, t) for t in texts])
            hits = sum(r is not None for r in raw)
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(STATS_KEY, "text:hit", hits)
                pipe.hincrby(STATS_KEY, "text:miss", len(texts) - hits)
                pipe.execute()
        except RedisError as exc:
            log.warning("text-embedding cache unavailable (%s); encoding the texts here", exc)
            return [None] * len(texts)
        return [np.frombuffer(r, dtype=np.float32) if r is not None else None for r in raw]

    def put_many(self, model: str, embeddings: dict[str, np.ndarray]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for text, vector in embeddings.items():
                    pipe.set(self.key(model, text), np.asarray(vector, dtype=np.float32).tobytes(), ex=self.ttl)
                pipe.execute()
        except RedisError as exc:
            log.warning("could not store text embeddings in Redis (%s)", exc)
