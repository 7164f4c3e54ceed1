"""The active-learning loop's state in Redis: what we delivered, what annotators corrected, calibrations.

    car:review:<p>:agreement          hash task -> JSON {version, fields}: each corrected task's agreement with
                                      our prediction (agreement.ProjectAgreement fields of that one task); an
                                      updated annotation replaces its task's entry, so nothing counts twice
    car:review:<p>:corrections        hash task -> JSON Correction (Correction.to_json): what calibration
                                      re-runs the engine on; plus the field `format` (JSON "json"), set by the
                                      first write of this version, which then drops the entries an older
                                      version left (pickles), so that they count for nothing. An entry that
                                      does not read as a Correction is skipped with a warning
    car:review:<p>:calibration        JSON Calibration: the project's current thresholds
    car:review:<p>:calibrating        lock: a calibration job is queued or running
    car:review:projects               set of the projects with agreement figures or a calibration (/metrics)

All keys of a project expire PROJECT_TTL_S after their last write, but the calibrating lock, which lives
CALIBRATION_LOCK_S (review.jobs) at most.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from redis import Redis

from car_backend.pipeline.plain import PlainError
from car_backend.pipeline.spec import JobSpec
from car_backend.queue.store import PREFIX, PROJECT_TTL_S
from car_backend.review.agreement import Bounds, ProjectAgreement, TaskAgreement

log = logging.getLogger(__name__)

# A field of the corrections hash (task ids are integers): the hash holds only what this version wrote.
FORMAT_FIELD, FORMAT = "format", '"json"'  # JSON too, like every value in the hash

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
    masks: dict[str, np.ndarray]  # label -> bool (H, W)

    def to_json(self) -> str:
        """{"task", "specs": [JobSpec.to_dict()], "masks": {label: {"shape": [h, w], "bits": base64 of the
        zlib-compressed np.packbits of the mask}}}."""
        masks = {}
        for label, mask in self.masks.items():
            mask = np.asarray(mask, dtype=bool)
            if mask.ndim != 2:
                raise ValueError(f"the mask of {label!r} is not 2-D: shape {mask.shape}")
            bits = zlib.compress(np.packbits(mask, axis=None).tobytes())
            masks[label] = {"shape": list(mask.shape), "bits": base64.b64encode(bits).decode("ascii")}
        return json.dumps({"task": self.task, "specs": [s.to_dict() for s in self.specs], "masks": masks})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Correction:
        """The inverse of `to_json`; ValueError for anything else (not JSON, or JSON of another shape)."""
        try:
            data = json.loads(raw)
            task = data["task"]
            if not isinstance(task, int) or isinstance(task, bool):
                raise ValueError(f"task is not an integer: {task!r:.40}")
            specs = tuple(JobSpec.from_dict(s) for s in data["specs"])
            masks = {}
            for label, entry in data["masks"].items():
                h, w = (int(n) for n in entry["shape"])
                bits = np.frombuffer(zlib.decompress(base64.b64decode(entry["bits"], validate=True)), dtype=np.uint8)
                if h < 0 or w < 0 or bits.size * 8 < h * w:
                    raise ValueError(f"the mask of {label!r} holds fewer bits than its shape {h}x{w}")
                masks[label] = np.unpackbits(bits, count=h * w).reshape(h, w).astype(bool)
        except (ValueError, KeyError, TypeError, AttributeError, PlainError, zlib.error, binascii.Error) as exc:
            # The type only: the message may quote the stored data (image URLs).
            raise ValueError(f"not a stored correction ({type(exc).__name__})") from None
        return cls(task, specs, masks)


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
        """Store a corrected task; the number of corrected tasks the project now has. The first write of
        this version to a project's hash drops what an older version left there (see the module docstring)."""
        key = self._key(project, "corrections")
        with self.redis.pipeline() as pipe:
            pipe.hset(key, str(correction.task), correction.to_json())
            pipe.hsetnx(key, FORMAT_FIELD, FORMAT)
            pipe.expire(key, PROJECT_TTL_S)
            pipe.hlen(key)
            _, first, _, count = pipe.execute()
        if first:
            count = self._drop_unreadable(project, key)
        return int(count) - 1  # the format field

    def corrections(self, project: str) -> list[Correction]:
        """The project's corrected tasks, by task; entries that do not read as a Correction (pickles left by
        an older version) are skipped, one warning each."""
        entries = self.redis.hgetall(self._key(project, "corrections"))
        found = [c for task, raw in entries.items() if (c := self._read(project, task, raw, "skipping")) is not None]
        return sorted(found, key=lambda c: c.task)

    def _drop_unreadable(self, project: str, key: str) -> int:
        """Delete the entries of the corrections hash that do not read as a Correction; its length after."""
        def drop(pipe: Any) -> None:  # re-run by redis-py when another write to the hash comes between
            entries = pipe.hgetall(key)
            bad = [task for task, raw in entries.items()
                   if task != FORMAT_FIELD.encode() and self._read(project, task, raw, "dropping") is None]
            pipe.multi()
            if bad:
                pipe.hdel(key, *bad)
            pipe.hlen(key)

        return int(self.redis.transaction(drop, key)[-1])

    @staticmethod
    def _read(project: str, task: bytes, raw: bytes, action: str) -> Correction | None:
        """The Correction in one hash entry; None, with a warning, for one that is not (the format field
        is neither, silently)."""
        if task == FORMAT_FIELD.encode():
            return None
        try:
            return Correction.from_json(raw)
        except ValueError as exc:
            log.warning("project %s: %s the stored correction of task %s (%s): an older version may have "
                        "written it; a new annotation of the task stores it again",
                        project, action, task.decode(errors="replace"), exc)
            return None

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

    # a calibration's progress between its slices (review.jobs): the candidates scored so far
    def calibration_progress(self, project: str) -> dict | None:
        raw = self.redis.get(self._key(project, "calibration-progress"))
        return json.loads(raw) if raw is not None else None

    def put_calibration_progress(self, project: str, progress: dict, ttl: int) -> None:
        self.redis.set(self._key(project, "calibration-progress"), json.dumps(progress), ex=ttl)

    def clear_calibration_progress(self, project: str) -> None:
        self.redis.delete(self._key(project, "calibration-progress"))

    def projects(self) -> list[str]:
        """Projects with review figures (for /metrics): one set read, not a scan of the keyspace."""
        return sorted(p.decode() for p in self.redis.smembers(f"{PREFIX}:review:projects"))

    @staticmethod
    def _register(pipe: Any, project: str) -> None:
        pipe.sadd(f"{PREFIX}:review:projects", project)
        pipe.expire(f"{PREFIX}:review:projects", PROJECT_TTL_S)
