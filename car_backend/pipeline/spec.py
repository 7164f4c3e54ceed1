"""What a job is: `JobSpec` (one image, the engine runs to make on it, how to turn them into regions) and
`JobResult` (the regions, or why there are none); `Project` (a parsed label config with its version).

Plain frozen dataclasses with JSON forms (`to_dict`/`from_dict`, see pipeline.plain): they travel through
Redis as JSON, never as pickles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from car_backend.labelstudio.config import LabelSpec, ProjectConfig, Target
from car_backend.labelstudio.interactive import Focus
from car_backend.pipeline.plain import from_plain, to_plain


@dataclass(frozen=True)
class TargetOutput:
    """Regions for one control: its labels (label i <-> query i of the run) in its region kind."""

    target: Target
    labels: tuple[LabelSpec, ...]
    kind: str  # "brush" | "polygon"


@dataclass(frozen=True)
class Run:
    """One call of the engine."""

    mode: str  # "semantic" | "referring"
    queries: tuple[str, ...]
    preset: str | None
    background: tuple[str, ...] | None
    outputs: tuple[TargetOutput, ...]
    proposals: str | None = None  # a control's car_proposals ("car" | "sam"); None = the engine's setting


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

    @property
    def key(self) -> str:
        identity = asdict(replace(self, task_id=None))
        blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        return from_plain(cls, data)


@dataclass(frozen=True)
class JobResult:
    """What one job produced for one image: the regions of every target, or why there are none."""

    ok: bool
    regions: list[dict]
    score: float | None = None
    error: str | None = None  # set when not ok; ok=False results are permanent failures
    seconds: float = 0.0

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
