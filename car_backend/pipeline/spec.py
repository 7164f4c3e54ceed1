"""What a job is: `JobSpec` (one image, the engine runs to make on it, how to turn them into regions) and
`JobResult` (the regions, or why there are none); `Project` (a parsed label config with its version).

Plain frozen dataclasses with JSON forms (`to_dict`/`from_dict`, see pipeline.plain): they travel through
Redis as JSON, never as pickles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property

from car_backend.labelstudio.config import LabelSpec, ProjectConfig, Target
from car_backend.labelstudio.interactive import Focus
from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.plain import from_plain, to_plain


@dataclass(frozen=True)
class TargetOutput:
    """Regions for one control: its labels (label i <-> query i of the run) in its region kind, one region per
    object (`instances`) or per label (see labelstudio.results.segmentation_to_regions)."""

    target: Target
    labels: tuple[LabelSpec, ...]
    kind: str  # "brush" | "polygon" | "rectangle" | "choices"
    instances: bool = False


@dataclass(frozen=True)
class Run:
    """One call of the engine."""

    mode: str  # "semantic" | "referring"
    queries: tuple[str, ...]
    preset: str | None
    background: tuple[str, ...] | None
    outputs: tuple[TargetOutput, ...]
    proposals: str | None = None  # a control's car_proposals ("car" | "sam"); None = the engine's setting

    @cached_property
    def json_text(self) -> str:
        """`to_plain(self)` as canonical JSON (sorted keys, no spaces), built once per object: planning gives
        equal runs of a request one object, so a 10,000-task /predict converts its runs once, not per task."""
        return _canonical(to_plain(self))


@dataclass(frozen=True)
class JobSpec:
    """One job: segment one task image for every target over it.

    `key` hashes everything that decides the output (not `task_id`), so equal keys share one RQ job and
    one cached result. `to_dict`/`from_dict` are its JSON form (RQ job arguments, stored corrections); a
    round trip keeps the key. `from_dict` raises PlainError for data of another shape.
    """

    image: str  # the task-data reference, as Label Studio sent it
    site: str  # LABEL_STUDIO_URL when `image` is relative to it, else ""
    task_id: int | None  # for presigning cloud URIs; not part of the key
    runs: tuple[Run, ...]
    model_version: str
    engine: str  # engine_fingerprint() of the settings that computed model_version
    polygon_tolerance: float
    score: str  # "confidence" | "uncertainty"
    focus: Focus | None = None  # interactive keypoints/rectangles that narrow the returned masks
    thresholds: tuple[tuple[str, float], ...] = ()  # the project's calibrated preset values, if any
    head: str = ""  # the project's adopted mask head: the sha256 of its weights (review.store.ReviewStore.put_head)

    @cached_property
    def key(self) -> str:
        """Computed once per object (`job_key`): a 10,000-task /predict asks for each key many times."""
        return job_key(self)

    def to_dict(self) -> dict:
        plain = to_plain(replace(self, runs=()))
        plain["runs"] = [json.loads(run.json_text) for run in self.runs]  # fresh objects: callers may change them
        return plain

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        return from_plain(cls, data)


_RUNS_SLOT = "\x00runs\x00"


def job_key(spec: JobSpec) -> str:
    """sha256 of the canonical JSON of everything in `spec` but `task_id` (see JobSpec). The runs' JSON is
    each run's cached `json_text`, put in place of a marker: the same text as dumping the whole spec."""
    identity = to_plain(replace(spec, task_id=None, runs=()))
    if not spec.head:  # keys of jobs without a head are what they were before heads existed
        del identity["head"]
    identity["runs"] = _RUNS_SLOT
    blob = _canonical(identity).replace(json.dumps(_RUNS_SLOT),
                                        "[" + ",".join(run.json_text for run in spec.runs) + "]", 1)
    return hashlib.sha256(blob.encode()).hexdigest()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class JobResult:
    """What one job produced for one image: the regions of every target, or why there are none.

    Three kinds: ok (regions); a permanent failure (ok=False: a property of the image itself, answered as
    an empty prediction); a pending failure (ok=False, pending=True: a setting or an outage caused it, so
    it is answered pending, cached at most CAR_PENDING_TTL seconds, and only believed by a reader whose
    settings give the same `conditions`, see pipeline.compute.failure_conditions).
    """

    ok: bool
    regions: list[dict]
    score: float | None = None
    error: str | None = None  # set when not ok
    seconds: float = 0.0
    pending: bool = False  # a failure that a setting or an outage may change: never a stored empty prediction
    conditions: str = ""  # failure_conditions() of the settings that produced a pending failure

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobResult:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Project:
    """A project's parsed label config, the model_version its predictions carry, and its calibrated
    thresholds (name -> value pairs applied to every run's preset)."""

    config: ProjectConfig
    version: str
    thresholds: tuple[tuple[str, float], ...] = ()  # calibrated preset values for every run of the project
    project: ProjectId | None = None  # which project of which Label Studio (from /predict's "project"), if known
    head: str = ""  # the adopted mask head's reference (JobSpec.head: sha256 of its weights), "" for none
    label_hash: str = ""  # labelstudio.config.config_hash of the label config alone: late writes check it
