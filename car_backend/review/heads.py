"""A project's mask head in Redis: the adopted weights, the last training's figures, its checkpoint and lock.

    car:review:<p>:head:<g>       zlib-compressed safetensors of the head adopted as fit generation g
                                  (engine.head.head_to_bytes); the two latest generations are kept
    car:review:<p>:fit            JSON FitStatus: the adopted generation and its reference, and the last
                                  training's progress and figures
    car:review:<p>:fit:checkpoint a training checkpoint (engine.head.state_to_bytes) that the next training
                                  resumes; deleted when a training finishes its epochs
    car:review:<p>:fitting        lock: a training is queued or running (FIT_LOCK_S at most)

A job names its head by reference, "<key>#<sha256 of the blob>" (`JobSpec.head`), and the worker loads it
once (`queue.jobs.WorkerContext.head`). Everything but the lock expires PROJECT_TTL_S after its last write.
`queue_fit` queues the training job (`review.fit.fit_project`, named by its import path so that the
modules that trigger a training need not import it); `fit_status` is what /status and the report show.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis

from car_backend.queue.store import PREFIX, PROJECT_TTL_S

FIT_JOB = "car_backend.review.fit.fit_project"
FIT_LOCK_S = 4 * 3600
KEPT_GENERATIONS = 2  # jobs queued just before an adoption still find the previous head


@dataclass
class FitStatus:
    """A project's mask-head state: what is adopted, and how the last training went.

    state: queued | training | done | failed. generation / head: the adopted head (0 / "" for none).
    before / after: mean agreement of the held-out corrected tasks with the model in use and with the
    trained head (mIoU likewise, over labels); adopted: whether the last training's head was adopted.
    """

    generation: int = 0
    head: str = ""
    state: str = "queued"
    reason: str = ""  # why a training was not adopted, or why it failed
    train_tasks: int = 0
    held_out_tasks: int = 0
    epochs: int = 0
    epochs_planned: int = 0
    losses: list[float] = field(default_factory=list)
    seconds_per_epoch: float = 0.0
    seconds: float = 0.0
    before: float | None = None
    after: float | None = None
    miou_before: float | None = None
    miou_after: float | None = None
    adopted: bool = False
    corrected_tasks: int = 0  # corrected tasks the project had when the last training started
    updated: float = 0.0  # unix time of the last write

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> FitStatus:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class HeadStore:
    """The keys above for every project; `redis` is passed in. Methods raise RedisError when Redis is down."""

    def __init__(self, redis: Redis):
        self.redis = redis

    @staticmethod
    def key(project: str, what: str) -> str:
        return f"{PREFIX}:review:{project}:{what}"

    def status(self, project: str) -> FitStatus | None:
        raw = self.redis.get(self.key(project, "fit"))
        if raw is None:
            return None
        try:
            return FitStatus.from_json(raw)
        except (ValueError, TypeError):
            return None

    def put_status(self, project: str, status: FitStatus) -> None:
        self.redis.set(self.key(project, "fit"), status.to_json(), ex=PROJECT_TTL_S)
        with self.redis.pipeline() as pipe:  # /metrics lists the projects with review figures
            pipe.sadd(f"{PREFIX}:review:projects", project)
            pipe.expire(f"{PREFIX}:review:projects", PROJECT_TTL_S)
            pipe.execute()

    def put_head(self, project: str, generation: int, blob: bytes) -> str:
        """Store generation `generation`'s weights; their reference (`JobSpec.head`). Drops older generations
        than the KEPT_GENERATIONS latest."""
        key = self.key(project, f"head:{generation}")
        with self.redis.pipeline() as pipe:
            pipe.set(key, blob, ex=PROJECT_TTL_S)
            for old in range(max(1, generation - 5), generation - KEPT_GENERATIONS + 1):
                pipe.delete(self.key(project, f"head:{old}"))
            pipe.execute()
        return f"{key}#{hashlib.sha256(blob).hexdigest()}"

    def checkpoint(self, project: str) -> bytes | None:
        return self.redis.get(self.key(project, "fit:checkpoint"))

    def put_checkpoint(self, project: str, blob: bytes) -> None:
        self.redis.set(self.key(project, "fit:checkpoint"), blob, ex=PROJECT_TTL_S)

    def drop_checkpoint(self, project: str) -> None:
        self.redis.delete(self.key(project, "fit:checkpoint"))

    def try_lock(self, project: str, owner: str) -> bool:
        return bool(self.redis.set(self.key(project, "fitting"), owner, nx=True, ex=FIT_LOCK_S))

    def unlock(self, project: str) -> None:
        self.redis.delete(self.key(project, "fitting"))


def queue_fit(queue: Any, redis: Redis, project: str, owner: str, timeout: int) -> str | None:
    """Queue a training of `project`'s mask head on the batch queue (`queue`: a queue.jobqueue.JobQueue); its
    RQ job id, or None when one is already queued or running (it will see the same corrections)."""
    store = HeadStore(redis)
    if not store.try_lock(project, owner):
        return None
    current = store.status(project) or FitStatus()
    current.state, current.reason = "queued", ""
    store.put_status(project, current)
    try:
        return queue.submit_call(FIT_JOB, (project,), description=f"fit the mask head of project {project}",
                                 timeout=timeout)
    except Exception:
        store.unlock(project)
        raise


def fit_status(redis: Redis, project: str) -> dict[str, Any] | None:
    """The fit status of a project as plain data (for /status, /metrics and the report); None before any
    training was queued. Raises RedisError when Redis is down."""
    status = HeadStore(redis).status(str(project))
    return asdict(status) if status is not None else None
