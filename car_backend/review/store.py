"""The active-learning state in Redis, one owner for every `car:review:` key (`ReviewStore`).

    car:review:<p>:agreement          hash task -> JSON {version, fields}: each corrected task's agreement with
                                      our prediction (agreement.ProjectAgreement fields of that one task); an
                                      updated annotation replaces its task's entry, so nothing counts twice
    car:review:<p>:corrections        hash task -> JSON Correction (Correction.to_json): what calibration and
                                      training re-run the engine on; plus the field `format` (JSON "json"),
                                      set by the first write of this version, which then drops the entries an
                                      older version left (pickles). An entry that does not read as a
                                      Correction is skipped with a warning
    car:review:<p>:calibration        JSON Calibration: the project's current thresholds
    car:review:<p>:calibrating        lock: a calibration job is queued or running
    car:review:<p>:calibration-progress  JSON CalibrationProgress: the candidates a sliced calibration scored
    car:review:<p>:fit                JSON FitStatus: the adopted mask head and the last training's figures
    car:review:<p>:fit:checkpoint     a training checkpoint (engine.head.state_to_bytes) the next one resumes
    car:review:<p>:fitting            lock: a training is queued or running
    car:review:head:<sha256>          zlib-compressed safetensors of an adopted mask head, named by the digest
                                      of its bytes: what `JobSpec.head` references (no key name in it)
    car:review:projects               set of project keys with review figures (/metrics)
    car:review:<id>:<what>            what an older version kept under Label Studio's bare project id;
                                      `adopt_legacy` moves it to the project's keys

<p> is a `ProjectId.key` (Label Studio instance, id and creation stamp). Everything expires PROJECT_TTL_S
after its last write, but the locks and the calibration progress (their own lifetimes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import zlib
from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np
from redis import Redis
from redis.client import Pipeline

from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.plain import PlainError, from_plain, to_plain
from car_backend.pipeline.spec import JobSpec
from car_backend.queue.keys import PROJECT_TTL_S, KeyFamily
from car_backend.review.agreement import Bounds, ProjectAgreement, TaskAgreement

log = logging.getLogger(__name__)

FIT_LOCK_S = 4 * 3600
KEPT_GENERATIONS = 2  # jobs queued just before an adoption still find the previous head
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
    """One corrected task: the jobs that predict it, the annotation's masks (shrunk, per label) and when the
    annotation was reviewed (unix time; 0 for a correction an older version stored: older than any other)."""

    task: int
    specs: tuple[JobSpec, ...]
    masks: dict[str, np.ndarray]  # label -> bool (H, W)
    annotated: float = 0.0

    def to_json(self) -> str:
        """{"task", "specs": [JobSpec.to_dict()], "masks": {label: {"shape": [h, w], "bits": base64 of the
        zlib-compressed np.packbits of the mask}}, "annotated"}."""
        masks = {}
        for label, mask in self.masks.items():
            mask = np.asarray(mask, dtype=bool)
            if mask.ndim != 2:
                raise ValueError(f"the mask of {label!r} is not 2-D: shape {mask.shape}")
            bits = zlib.compress(np.packbits(mask, axis=None).tobytes())
            masks[label] = {"shape": list(mask.shape), "bits": base64.b64encode(bits).decode("ascii")}
        return json.dumps({"task": self.task, "specs": [s.to_dict() for s in self.specs], "masks": masks,
                           "annotated": self.annotated})

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
            annotated = float(data.get("annotated", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError, PlainError, zlib.error, binascii.Error) as exc:
            # The type only: the message may quote the stored data (image URLs).
            raise ValueError(f"not a stored correction ({type(exc).__name__})") from None
        return cls(task, specs, masks, annotated)


@dataclass(frozen=True)
class Calibration:
    """Thresholds chosen for a project, with the agreement they gave on its corrected tasks."""

    generation: int  # 1 for the first calibration of a project; part of the model_version
    thresholds: dict[str, float]
    previous: dict[str, float]  # the thresholds in use before (the preset's, for a first calibration)
    tasks: int  # corrected tasks it was chosen on (the MAX_CALIBRATION_TASKS most recent at most)
    before: float  # mean agreement with the thresholds in use before
    after: float  # mean agreement with the chosen ones
    labels_before: dict[str, float] = field(default_factory=dict)  # per-label IoU
    labels_after: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0
    # corrected tasks the project had when it ran: the next one waits for CAR_CALIBRATE_AFTER more (0: written
    # by an older version, which recorded only `tasks`)
    corrected_tasks: int = 0
    reason: str = ""  # why the last calibration tried nothing (out of memory), else ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Calibration:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class FitState(str, Enum):
    QUEUED = "queued"
    TRAINING = "training"
    DONE = "done"
    FAILED = "failed"


@dataclass
class FitStatus:
    """A project's mask-head state: what is adopted, and how the last training went.

    state: a FitState. generation / head: the adopted head (0 / "" for none; `head` is the sha256 of its
    bytes, the `JobSpec.head` reference).
    before / after: mean agreement of the held-out corrected tasks with the model in use and with the
    trained head (mIoU likewise, over labels); adopted: whether the last training's head was adopted.
    """

    generation: int = 0
    head: str = ""
    state: FitState = FitState.QUEUED
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
    left_out: int = 0  # the oldest training tasks whose features did not fit in CAR_FIT_MEMORY_MB
    features_mb: float = 0.0  # what the last training's features held
    kept: list[str] = field(default_factory=list)  # digests of the stored heads, oldest first
    updated: float = 0.0  # unix time of the last write

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> FitStatus:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["state"] = FitState(known.get("state", FitState.QUEUED.value))
        return cls(**known)


@dataclass(frozen=True)
class CalibrationProgress:
    """The candidates a sliced calibration scored so far: the corrected tasks and start thresholds it runs
    on, the seconds spent, and each scored candidate's agreement fields (JSON of its sorted threshold pairs
    -> ProjectAgreement fields)."""

    tasks: tuple[int, ...]
    start: dict[str, float]
    seconds: float
    evaluated: dict[str, dict[str, float]]

    def to_json(self) -> str:
        return json.dumps(to_plain(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> CalibrationProgress:
        return from_plain(cls, json.loads(raw))


def _read_fit_status(raw: bytes) -> FitStatus | None:
    """The FitStatus in `raw`; None for anything unreadable."""
    try:
        return FitStatus.from_json(raw)
    except (ValueError, TypeError):
        return None


class ReviewStore:
    """The active-learning state of every project (see the module docstring); `redis` is passed in.
    Methods raise RedisError when Redis is unavailable."""

    AGREEMENT = KeyFamily("car:review:<p>:agreement", "ReviewStore", "PROJECT_TTL_S after the last write")
    CORRECTIONS = KeyFamily("car:review:<p>:corrections", "ReviewStore", "PROJECT_TTL_S after the last write")
    CALIBRATION = KeyFamily("car:review:<p>:calibration", "ReviewStore", "PROJECT_TTL_S")
    CALIBRATING = KeyFamily("car:review:<p>:calibrating", "ReviewStore",
                            "CALIBRATION_LOCK_S = 3600 s; deleted when calibration ends")
    PROGRESS = KeyFamily("car:review:<p>:calibration-progress", "ReviewStore",
                         "CALIBRATION_LOCK_S; deleted when calibration ends")
    FIT = KeyFamily("car:review:<p>:fit", "ReviewStore", "PROJECT_TTL_S")
    CHECKPOINT = KeyFamily("car:review:<p>:fit:checkpoint", "ReviewStore",
                           "PROJECT_TTL_S; deleted when a training finishes its epochs")
    FITTING = KeyFamily("car:review:<p>:fitting", "ReviewStore", "FIT_LOCK_S = 4 h; deleted when the training ends")
    HEAD = KeyFamily("car:review:head:<sha256>", "ReviewStore",
                     "PROJECT_TTL_S; the KEPT_GENERATIONS latest of a project kept")
    PROJECTS = KeyFamily("car:review:projects", "ReviewStore", "PROJECT_TTL_S")
    # What the previous version kept under Label Studio's bare project id; `adopt_legacy` renames it.
    LEGACY = KeyFamily("car:review:<id>:<what>", "ReviewStore",
                       "as the previous version left it; renamed by adopt_legacy when the project is first seen")
    LEGACY_PARTS = ("agreement", "corrections", "calibration", "fit:checkpoint")

    def __init__(self, redis: Redis):
        self.redis = redis

    # agreement of corrected tasks with our predictions
    def put_agreement(self, project: ProjectId, task: int, version: str, agreement: TaskAgreement) -> None:
        single = ProjectAgreement()
        single.add(agreement)
        key = self.AGREEMENT.key(project.key)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, str(task), json.dumps({"version": version, "fields": single.to_fields()}))
            pipe.expire(key, PROJECT_TTL_S)
            self._register(pipe, project)
            pipe.execute()

    def agreement(self, project: ProjectId) -> dict[str, ProjectAgreement]:
        """Per model_version: the sum over the project's corrected tasks predicted with that version."""
        totals: dict[str, dict[str, float]] = {}
        for raw in self.redis.hvals(self.AGREEMENT.key(project.key)):
            entry = json.loads(raw)
            fields = totals.setdefault(entry["version"], {})
            for name, value in entry["fields"].items():
                fields[name] = fields.get(name, 0.0) + value
        return {version: ProjectAgreement.from_fields(fields) for version, fields in totals.items()}

    # corrections (calibration's and training's input)
    def put_correction(self, project: ProjectId, correction: Correction) -> int:
        """Store a corrected task; the number of corrected tasks the project now has. The first write of
        this version to a project's hash drops what an older version left there (see the module docstring)."""
        key = self.CORRECTIONS.key(project.key)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, str(correction.task), correction.to_json())
            pipe.hsetnx(key, FORMAT_FIELD, FORMAT)
            pipe.expire(key, PROJECT_TTL_S)
            pipe.hlen(key)
            _, first, _, count = pipe.execute()
        if first:
            count = self._drop_unreadable(project, key)
        return int(count) - 1  # the format field

    def corrections(self, project: ProjectId) -> list[Correction]:
        """The project's corrected tasks, oldest annotation first (then by task); entries that do not read as
        a Correction (pickles left by an older version) are skipped, one warning each."""
        entries = self.redis.hgetall(self.CORRECTIONS.key(project.key))
        found = [c for task, raw in entries.items() if (c := self._read(project, task, raw, "skipping")) is not None]
        return sorted(found, key=lambda c: (c.annotated, c.task))

    def corrected_tasks(self, project: ProjectId) -> int:
        """How many corrected tasks the project has (entries of its corrections hash), without reading them."""
        key = self.CORRECTIONS.key(project.key)
        with self.redis.pipeline() as pipe:
            pipe.hlen(key)
            pipe.hexists(key, FORMAT_FIELD)
            count, marked = pipe.execute()
        return int(count) - int(bool(marked))

    def _drop_unreadable(self, project: ProjectId, key: str) -> int:
        """Delete the entries of the corrections hash that do not read as a Correction; its length after."""
        def drop(pipe: Pipeline) -> None:  # re-run by redis-py when another write to the hash comes between
            entries = pipe.hgetall(key)
            bad = [task for task, raw in entries.items()
                   if task != FORMAT_FIELD.encode() and self._read(project, task, raw, "dropping") is None]
            pipe.multi()
            if bad:
                pipe.hdel(key, *bad)
            pipe.hlen(key)

        return int(self.redis.transaction(drop, key)[-1])

    @staticmethod
    def _read(project: ProjectId, task: bytes, raw: bytes, action: str) -> Correction | None:
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
    def calibration(self, project: ProjectId) -> Calibration | None:
        raw = self.redis.get(self.CALIBRATION.key(project.key))
        return Calibration.from_json(raw) if raw is not None else None

    def put_calibration(self, project: ProjectId, calibration: Calibration) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self.CALIBRATION.key(project.key), calibration.to_json(), ex=PROJECT_TTL_S)
            self._register(pipe, project)
            pipe.execute()

    def try_lock_calibration(self, project: ProjectId, owner: str, ttl: int) -> bool:
        return bool(self.redis.set(self.CALIBRATING.key(project.key), owner, nx=True, ex=ttl))

    def unlock_calibration(self, project: ProjectId) -> None:
        self.redis.delete(self.CALIBRATING.key(project.key))

    def calibration_progress(self, project: ProjectId) -> CalibrationProgress | None:
        raw = self.redis.get(self.PROGRESS.key(project.key))
        if raw is None:
            return None
        try:
            return CalibrationProgress.from_json(raw)
        except (ValueError, PlainError):  # written by an older version: start the search over
            return None

    def put_calibration_progress(self, project: ProjectId, progress: CalibrationProgress, ttl: int) -> None:
        self.redis.set(self.PROGRESS.key(project.key), progress.to_json(), ex=ttl)

    def clear_calibration_progress(self, project: ProjectId) -> None:
        self.redis.delete(self.PROGRESS.key(project.key))

    # the mask head: status, checkpoint, lock and adopted weights
    def fit_status(self, project: ProjectId) -> FitStatus | None:
        """The project's mask-head status; None before any training was queued (or unreadable)."""
        raw = self.redis.get(self.FIT.key(project.key))
        return _read_fit_status(raw) if raw is not None else None

    def fit_and_calibration(self, project: ProjectId) -> tuple[FitStatus | None, Calibration | None]:
        """`fit_status` and `calibration` in one Redis round trip (for /status)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.FIT.key(project.key))
            pipe.get(self.CALIBRATION.key(project.key))
            fit, calibration = pipe.execute()
        return (_read_fit_status(fit) if fit is not None else None,
                Calibration.from_json(calibration) if calibration is not None else None)

    def put_fit_status(self, project: ProjectId, status: FitStatus) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self.FIT.key(project.key), status.to_json(), ex=PROJECT_TTL_S)
            self._register(pipe, project)
            pipe.execute()

    def put_head(self, status: FitStatus, blob: bytes) -> str:
        """Store an adopted head's weights; their reference (the sha256 of `blob`, for `JobSpec.head`).
        `status.kept` gains it and loses (deleting their blobs) all but the KEPT_GENERATIONS latest."""
        digest = hashlib.sha256(blob).hexdigest()
        kept = [*status.kept, digest][-KEPT_GENERATIONS:]
        with self.redis.pipeline() as pipe:
            pipe.set(self.HEAD.key(digest), blob, ex=PROJECT_TTL_S)
            for old in status.kept:
                if old not in kept:
                    pipe.delete(self.HEAD.key(old))
            pipe.execute()
        status.kept = kept
        return digest

    def head_blob(self, reference: str) -> bytes | None:
        """The weights `reference` (a sha256) names, if they are still stored."""
        return self.redis.get(self.HEAD.key(reference))

    def checkpoint(self, project: ProjectId) -> bytes | None:
        return self.redis.get(self.CHECKPOINT.key(project.key))

    def put_checkpoint(self, project: ProjectId, blob: bytes) -> None:
        self.redis.set(self.CHECKPOINT.key(project.key), blob, ex=PROJECT_TTL_S)

    def drop_checkpoint(self, project: ProjectId) -> None:
        self.redis.delete(self.CHECKPOINT.key(project.key))

    def try_lock_fit(self, project: ProjectId, owner: str) -> bool:
        return bool(self.redis.set(self.FITTING.key(project.key), owner, nx=True, ex=FIT_LOCK_S))

    def unlock_fit(self, project: ProjectId) -> None:
        self.redis.delete(self.FITTING.key(project.key))

    def projects(self) -> list[ProjectId]:
        """Projects with review figures (for /metrics): one set read, not a scan of the keyspace."""
        found = []
        for raw in self.redis.smembers(self.PROJECTS.key()):
            try:
                found.append(ProjectId.from_key(raw.decode()))
            except ValueError:  # a bare id an older version registered
                continue
        return sorted(found)

    def adopt_legacy(self, project: ProjectId) -> bool:
        """Move what the previous version kept under `project`'s bare id (agreement, corrections, calibration,
        mask head and its status) to `project`'s keys, where these do not exist yet; True when anything
        moved. The head's blob moves to its digest's key and the status names it by digest (the project's
        model_version changes once). The first project seen with that id after the upgrade adopts it."""
        moved = False
        for part, family in zip(self.LEGACY_PARTS, (self.AGREEMENT, self.CORRECTIONS, self.CALIBRATION,
                                                    self.CHECKPOINT), strict=True):
            source = self.LEGACY.key(project.id, part)
            if self.redis.exists(source) and self.redis.renamenx(source, family.key(project.key)):
                moved = True
        raw = None
        if self.fit_status(project) is None:
            with self.redis.pipeline() as pipe:  # taken by one process only
                pipe.get(self.LEGACY.key(project.id, "fit"))
                pipe.delete(self.LEGACY.key(project.id, "fit"))
                raw, _ = pipe.execute()
        status = _read_fit_status(raw) if raw is not None else None
        if status is not None:
            key = status.head.rpartition("#")[0]
            blob = self.redis.get(key) if key.startswith(self.LEGACY.key(project.id, "head") + ":") else None
            if blob is None:  # its weights are gone: no head in use
                status.generation, status.head, status.kept = 0, "", []
            else:
                status.kept = []
                status.head = self.put_head(status, blob)
                self.redis.delete(key)
            self.put_fit_status(project, status)
            moved = True
        if moved:
            with self.redis.pipeline() as pipe:
                pipe.srem(self.PROJECTS.key(), str(project.id))
                self._register(pipe, project)
                pipe.execute()
            log.info("project %s: adopted the review state an older version kept under its bare id", project)
        return moved

    def _register(self, pipe: Pipeline, project: ProjectId) -> None:
        pipe.sadd(self.PROJECTS.key(), project.key)
        pipe.expire(self.PROJECTS.key(), PROJECT_TTL_S)
