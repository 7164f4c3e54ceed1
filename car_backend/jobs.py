"""One job: segment one task image for one group of targets, cache the result, deliver late tasks.

A job is described by a `JobSpec` built by the server (or `prelabel`) from a task and the project's label
config; its `key` hashes everything that decides the output, so equal keys share one job and one cached
result. `run_job` is what RQ executes in a worker process (or the embedded worker thread):

1. a cached result is reused (a retry after a failed delivery, or a duplicate submission);
2. otherwise the image is fetched and segmented (once per run: one semantic run with the union
   vocabulary of the image's targets, one referring run per target with sentences) and the regions of
   every target are cached; a permanent failure (undecodable image, ...) is cached as such, a transient
   one raises so RQ retries the job;
3. tasks registered as late (their /predict stopped waiting, or `prelabel` enqueued them) are written
   into Label Studio through the API, each one only if this worker wins its delivery claim.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from car_backend.labelstudio.config import LabelSpec, Target
from car_backend.labelstudio.interactive import Focus
from car_backend.labelstudio.media import MediaError, MediaFetcher
from car_backend.labelstudio.results import failed_entry, prediction_entry, segmentation_to_regions
from car_backend.lsapi import LabelStudioAPIError, LabelStudioClient, configured
from car_backend.review import ReviewStore
from car_backend.settings import Settings
from car_backend.store import JobResult, LateRecord, RedisTextCache, Store

if TYPE_CHECKING:  # the engine package is imported only where jobs run
    from car_backend.engine.result import Segmentation

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class JobSpec:
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


def engine_fingerprint(settings: Settings) -> str:
    """The engine settings a worker must share with the server that computed a job's model_version."""
    parts = {
        "proposal": settings.proposal_model,
        "classifier": settings.classifier_model,
        "sam": os.path.basename(settings.sam_checkpoint),
        "sam_type": settings.sam_model_type if settings.sam_checkpoint else "",
        "max_steps": settings.max_steps,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def compute(spec: JobSpec, segmenter: Any, fetcher: MediaFetcher) -> JobResult:
    """Fetch and segment the image; a permanent media failure becomes a failed result, a transient one raises."""
    started = time.monotonic()
    try:
        image = fetcher.fetch(spec.image, spec.task_id)
    except MediaError as exc:
        if not exc.permanent:
            raise
        return JobResult(ok=False, regions=[], error=str(exc), seconds=time.monotonic() - started)
    regions: list[dict] = []
    kept_scores: list[float] = []
    margins: list[float] = []
    for run in spec.runs:
        seg = segment_run(segmenter, image, run, dict(spec.thresholds))
        kept_scores.extend(float(s) for s in seg.scores if s > 0)
        if seg.margin is not None:
            margins.append(float(seg.margin))
        for out in run.outputs:
            own = seg if run.mode == "referring" else restrict(seg, [label.prompt for label in out.labels])
            if spec.focus is not None:
                own = spec.focus.apply(own)
            regions.extend(segmentation_to_regions(own, out.target, list(out.labels), kind=out.kind,
                                                   polygon_tolerance=spec.polygon_tolerance))
    return JobResult(ok=True, regions=regions, score=task_score(kept_scores, spec.score, margins),
                     seconds=time.monotonic() - started)


def segment_run(segmenter: Any, image: Any, run: Run, thresholds: dict[str, float]) -> Segmentation:
    """The engine's answer for one run on an image (or a prepared image), `thresholds` overriding its preset."""
    preset: Any = run.preset
    if thresholds:
        from car_backend.engine.presets import get_preset

        preset = replace(get_preset(run.preset or segmenter.settings.preset), **thresholds)
    return segmenter.segment(image, list(run.queries), preset=preset, mode=run.mode,
                             background=list(run.background) if run.background else None)


def restrict(seg: Segmentation, prompts: list[str]) -> Segmentation:
    """The part of a union-vocabulary segmentation that concerns `prompts` (a subset of its queries)."""
    if list(prompts) == list(seg.queries):
        return seg
    first = {}
    for i, query in enumerate(seg.queries):
        first.setdefault(query, i)
    picked = [first[p] for p in prompts]
    lut = np.zeros(len(seg.queries) + 1, dtype=np.int32)  # union label i + 1 -> own label j + 1, else 0
    for j, i in reversed(list(enumerate(picked))):
        lut[i + 1] = j + 1
    return replace(seg, queries=list(prompts), label_map=lut[seg.label_map], masks=seg.masks[picked],
                   scores=seg.scores[picked])


def task_score(kept: list[float], mode: str, margins: list[float] = ()) -> float | None:
    """The prediction-level score Label Studio sorts tasks by.

    confidence: the mean kept-label classifier score. uncertainty: 1 - confidence x margin, where margin is
    the CRF's mean per-pixel gap between its two most probable labels: a prediction is likely to be changed
    when the classifier hesitated over which labels are there or the CRF over where their borders run.
    """
    if not kept:
        return None
    confidence = float(np.mean(kept))
    if mode != "uncertainty":
        return round(confidence, 6)
    margin = float(np.mean(margins)) if len(margins) else 1.0
    return round(1.0 - confidence * margin, 6)


def task_entry(results: list[JobResult], version: str) -> dict:
    """One /predict entry from the results of all of a task's jobs (every one finished)."""
    ok = [r for r in results if r.ok]
    if not ok:
        return failed_entry(version, "; ".join(r.error or "failed" for r in results))
    regions = [region for r in ok for region in r.regions]
    scores = [r.score for r in ok if r.score is not None]
    return prediction_entry(regions, version, score=round(float(np.mean(scores)), 6) if scores else None)


class WorkerContext:
    """What jobs need in a worker process: settings, Redis state, the engine (loaded on first use)."""

    def __init__(self, settings: Settings, store: Store, name: str | None = None):
        self.settings = settings
        self.store = store
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.fetcher = MediaFetcher(settings)
        self.ls = LabelStudioClient(settings) if configured(settings) else None
        self.review = ReviewStore(store.redis, settings.result_ttl)
        self._segmenter: Any = None
        self._lock = threading.Lock()

    @property
    def segmenter(self) -> Any:
        with self._lock:
            if self._segmenter is None:
                import torch  # imported only where jobs run

                from car_backend.engine import Segmenter

                if self.settings.threads:
                    torch.set_num_threads(self.settings.threads)
                ttl = self.settings.text_cache_ttl
                cache = RedisTextCache(self.store.redis, ttl) if ttl else None
                self._segmenter = Segmenter(self.settings, text_cache=cache)
            return self._segmenter


    @property
    def queue(self) -> Any:
        """The job queue, for jobs that queue follow-up jobs."""
        from car_backend.jobqueue import JobQueue  # jobqueue imports this module

        return JobQueue(self.settings, self.store.redis, self.store)


_context: WorkerContext | None = None


def install(context: WorkerContext) -> None:
    """Make `context` the one run_job uses in this process (the worker does this at start)."""
    global _context
    _context = context


def current_context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("no worker context: car_backend.jobs.install() was not called in this process")
    return _context


class EngineMismatch(RuntimeError):
    """The worker's engine settings differ from those of the server that built the job."""


def run_job(spec: JobSpec) -> dict:
    """The RQ entry point (see the module docstring)."""
    ctx = current_context()
    key = spec.key
    result = ctx.store.results([key])[0]
    if result is None:
        result = _compute_and_record(ctx, spec)
        ctx.store.put_result(key, result)
    delivered = deliver_late(ctx, key)
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        ctx.store.release_job_lock(key, job.id)
    return {"ok": result.ok, "delivered": delivered, "seconds": round(result.seconds, 3)}


def _compute_and_record(ctx: WorkerContext, spec: JobSpec) -> JobResult:
    started = time.monotonic()
    try:
        if spec.engine != engine_fingerprint(ctx.settings):
            raise EngineMismatch(
                "this worker's engine settings (CAR_PROPOSAL_MODEL, CAR_CLASSIFIER_MODEL, CAR_SAM_CHECKPOINT, "
                "CAR_MAX_STEPS) differ from the server's; give both the same values")
        result = compute(spec, ctx.segmenter, ctx.fetcher)
    except Exception as exc:
        ctx.store.record_job("error", time.monotonic() - started)
        log.warning("job %s failed (%s: %s); RQ retries it while retries are left",
                    spec.key[:12], type(exc).__name__, exc)
        raise
    ctx.store.record_job("ok" if result.ok else "failed", result.seconds)
    if not result.ok:
        log.warning("job %s failed permanently: %s", spec.key[:12], result.error)
    return result


def deliver_late(ctx: WorkerContext, key: str) -> int:
    """Write the late tasks waiting on `key` into Label Studio (those whose every job is finished)."""
    if ctx.ls is None:
        return 0
    delivered = 0
    for record in ctx.store.late(key):
        results = ctx.store.results(record.keys)
        if any(r is None for r in results):
            continue  # the job finishing last delivers it
        delivered += deliver(ctx.store, ctx.ls, record, results, owner=f"worker:{ctx.name}", review=ctx.review)
    return delivered


def deliver(store: Store, ls: LabelStudioClient, record: LateRecord, results: list[JobResult], owner: str,
            review: ReviewStore) -> int:
    """Post one task's prediction if this caller wins its claim; 1 when it was posted here.

    A transient API failure gives the claim back and raises (the job is retried and finds its result
    cached); a permanent one (the task is gone) drops the record.
    """
    entry = task_entry(results, record.version)
    posted = 0
    if store.claim([record.task], record.version, owner)[0]:
        try:
            ls.create_prediction(record.task, entry)
        except LabelStudioAPIError as exc:
            store.release_claim(record.task, record.version, owner)
            if exc.transient:
                raise
            log.error("dropping the prediction for task %s: %s", record.task, exc)
        else:
            posted = 1
            store.record_delivery("api")
            review.record_delivered([(record.task, record.version, record.keys)])
            log.info("wrote the prediction for task %s into Label Studio", record.task)
    store.remove_late(record)
    return posted
