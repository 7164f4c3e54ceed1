"""The active-learning loop's state in Redis: what we delivered, what annotators corrected, calibrations.

    car:review:<p>:agreement          hash task -> JSON {version, fields}: each corrected task's agreement with
                                      our prediction (agreement.ProjectAgreement fields of that one task); an
                                      updated annotation replaces its task's entry, so nothing counts twice
    car:review:<p>:corrections        hash task -> pickled Correction: what calibration re-runs the engine on
    car:review:<p>:calibration        JSON Calibration: the project's current thresholds
    car:review:<p>:calibrating        lock: a calibration job is queued or running
    car:review:projects               set of the projects with agreement figures or a calibration (/metrics)

All keys of a project expire PROJECT_TTL_S after their last write.
"""

from __future__ import annotations

import json
import pickle
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from redis import Redis

from car_backend.pipeline.spec import JobSpec
from car_backend.queue.store import PREFIX, PROJECT_TTL_S
from car_backend.review.agreement import Bounds, ProjectAgreement, TaskAgreement

# The thresholds calibration may move, and how far: the paper's per-dataset values all lie inside.
THRESHOLD_BOUNDS = (
    Bounds("confidence_threshold", 0.1, 0.9, 9),  # keep threshold theta
    Bounds("mask_threshold", 0.2, 0.8, 7),  # eta, binarises proposals for the visual prompts
    Bounds("clipes_threshold", 0.2, 0.7, 6),  # lambda, the CLIP-ES box threshold on the raw CAM
)


@dataclass(frozen=True)
class Correction:
    """One corrected task: the jobs that predict it and the annotation's masks (shrunk, per label)."""

    task: int
    specs: tuple[JobSpec, ...]
    masks: dict[str, np.ndarray]


@dataclass(frozen=True)
class Calibration:
    """Thresholds chosen for a project, with the agreement they gave on its corrected tasks."""

    generation: int  # 1 for the first calibration of a project; part of the model_version
    thresholds: dict[str, float]
    previous: dict[str, float]  # the thresholds in use before (the preset's, for a first calibration)
    tasks: int  # corrected tasks it was chosen on
    before: float  # mean agreement with the thresholds in use before
    after: float  # mean agreement with the chosen ones
    labels_before: dict[str, float] = field(default_factory=dict)  # per-label IoU
    labels_after: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Calibration:
        return cls(**json.loads(raw))


class ReviewStore:
    """The active-learning state of every project (see the module docstring); `redis` is passed in.
    Methods raise RedisError when Redis is unavailable."""

    def __init__(self, redis: Redis):
        self.redis = redis

    @staticmethod
    def _key(project: str, what: str) -> str:
        return f"{PREFIX}:review:{project}:{what}"

    # agreement of corrected tasks with our predictions
    def put_agreement(self, project: str, task: int, version: str, agreement: TaskAgreement) -> None:
        single = ProjectAgreement()
        single.add(agreement)
        key = self._key(project, "agreement")
        with self.redis.pipeline() as pipe:
            pipe.hset(key, str(task), json.dumps({"version": version, "fields": single.to_fields()}))
            pipe.expire(key, PROJECT_TTL_S)
            self._register(pipe, project)
            pipe.execute()

    def agreement(self, project: str) -> dict[str, ProjectAgreement]:
        """Per model_version: the sum over the project's corrected tasks predicted with that version."""
        totals: dict[str, dict[str, float]] = {}
        for raw in self.redis.hvals(self._key(project, "agreement")):
            entry = json.loads(raw)
            fields = totals.setdefault(entry["version"], {})
            for name, value in entry["fields"].items():
                fields[name] = fields.get(name, 0.0) + value
        return {version: ProjectAgreement.from_fields(fields) for version, fields in totals.items()}

    # corrections (calibration's input)
    def put_correction(self, project: str, correction: Correction) -> int:
        """Store a corrected task; the number of corrected tasks the project now has."""
        key = self._key(project, "corrections")
        with self.redis.pipeline() as pipe:
            pipe.hset(key, str(correction.task), zlib.compress(pickle.dumps(correction)))
            pipe.expire(key, PROJECT_TTL_S)
            pipe.hlen(key)
            return int(pipe.execute()[-1])

    def corrections(self, project: str) -> list[Correction]:
        raw = self.redis.hvals(self._key(project, "corrections"))
        return sorted((pickle.loads(zlib.decompress(r)) for r in raw), key=lambda c: c.task)

    # calibrations
    def calibration(self, project: str) -> Calibration | None:
        raw = self.redis.get(self._key(project, "calibration"))
        return Calibration.from_json(raw) if raw is not None else None

    def put_calibration(self, project: str, calibration: Calibration) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self._key(project, "calibration"), calibration.to_json(), ex=PROJECT_TTL_S)
            self._register(pipe, project)
            pipe.execute()

    def try_lock_calibration(self, project: str, owner: str, ttl: int) -> bool:
        return bool(self.redis.set(self._key(project, "calibrating"), owner, nx=True, ex=ttl))

    def unlock_calibration(self, project: str) -> None:
        self.redis.delete(self._key(project, "calibrating"))

    def projects(self) -> list[str]:
        """Projects with review figures (for /metrics): one set read, not a scan of the keyspace."""
        return sorted(p.decode() for p in self.redis.smembers(f"{PREFIX}:review:projects"))

    @staticmethod
    def _register(pipe: Any, project: str) -> None:
        pipe.sadd(f"{PREFIX}:review:projects", project)
        pipe.expire(f"{PREFIX}:review:projects", PROJECT_TTL_S)
