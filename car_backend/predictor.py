"""/predict: tasks in, exactly one Label Studio entry per task out (protocol spec §3.1, §11).

1. Each task becomes one job per image it has targets on (`plan_task`).
2. Cached results are used at once; the other jobs are submitted (deduplicated by key) and the request
   waits for them up to CAR_PREDICT_WAIT.
3. Tasks whose jobs all finished are delivered here, each only if this request wins the task's delivery
   claim (so a task is never delivered twice, whatever overlaps); a permanent failure is delivered as an
   empty prediction (Label Studio stores it and stops asking).
4. Other tasks get a pending entry (no `result`: Label Studio stores nothing and asks again). They are
   registered as late, so the worker finishing their job writes the prediction through the API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis import RedisError

from car_backend.jobqueue import JobQueue
from car_backend.jobs import JobSpec, Run, TargetOutput, engine_fingerprint, task_entry
from car_backend.labelstudio.config import LabelSpec, ProjectConfig, Target, task_sentences, task_vocabulary
from car_backend.labelstudio.interactive import InteractiveRequest, focus_of, label_named_by, parse_context
from car_backend.labelstudio.results import failed_entry, pending_entry
from car_backend.lsapi import configured
from car_backend.metrics import Metrics
from car_backend.projects import Project
from car_backend.review import ReviewStore
from car_backend.settings import Settings
from car_backend.store import JobResult, LateRecord, Store

log = logging.getLogger(__name__)

POLL_FIRST_S = 0.05
POLL_MAX_S = 0.5
TERMINAL = {"failed", "stopped", "canceled", "finished"}


@dataclass
class TaskPlan:
    task_id: int | None
    specs: list[JobSpec] = field(default_factory=list)
    failure: str | None = None  # a permanent problem found while planning: no job is needed

    @property
    def keys(self) -> list[str]:
        return [spec.key for spec in self.specs]


def output_targets(config: ProjectConfig, settings: Settings) -> tuple[Target, ...]:
    """The controls to fill: the project's `output` extra_param, else CAR_OUTPUT, picks the controls of that
    kind when the config has both; a control's region type is always its own, because Label Studio cannot
    show a polygon in a BrushLabels control or a mask in a PolygonLabels one."""
    for choice in (config.output, settings.output):
        if choice and choice != "auto":
            return tuple(t for t in config.targets if t.kind == choice) or config.targets
    return config.targets


def plan_task(task: dict, project: Project, settings: Settings, prompt: list[str] | None = None,
              request: InteractiveRequest | None = None) -> TaskPlan:
    """The jobs of one task: one per image, with every target over that image.

    Interactive calls give `prompt` (the sentences typed into the config's TextArea) and `request` (what the
    annotator drew: the selected label, keypoints, rectangles).
    """
    config = project.config
    task_id = task.get("id") if isinstance(task.get("id"), int) else None
    data = task.get("data")
    if not isinstance(data, dict):
        return TaskPlan(task_id, failure="the task has no data object")
    by_image: dict[str, list[Target]] = {}
    for target in output_targets(config, settings):
        by_image.setdefault(target.data_key, []).append(target)
    plan = TaskPlan(task_id)
    problems = []
    for data_key, targets in by_image.items():
        ref = data.get(data_key)
        if not isinstance(ref, str) or not ref.strip():
            problems.append(f"the task data has no image under {data_key!r}")
            continue
        runs = _runs(targets, data, project, settings, prompt, request)
        if not runs:
            problems.append(f"no labels to look for in {', '.join(t.from_name for t in targets)}")
            continue
        relative = not ref.strip().lower().startswith(("http://", "https://", "s3://", "gs://", "azure-blob://"))
        plan.specs.append(JobSpec(
            image=ref.strip(), site=settings.label_studio_url if relative else "", task_id=task_id,
            runs=tuple(runs), model_version=project.version, engine=engine_fingerprint(settings),
            polygon_tolerance=settings.polygon_tolerance, score=settings.score,
            focus=focus_of(request, request.label if request else None), thresholds=project.thresholds))
    if not plan.specs:
        plan.failure = "; ".join(problems) or "nothing to predict"
    elif problems:
        log.warning("task %s: %s", task_id, "; ".join(problems))
    return plan


def _runs(targets: list[Target], data: dict, project: Project, settings: Settings,
          prompt: list[str] | None, request: InteractiveRequest | None) -> list[Run]:
    config = project.config
    pointed = request is not None and bool(request.points or request.boxes)
    semantic: dict[tuple, list[TargetOutput]] = {}
    runs = []
    for target in targets:
        labels = task_vocabulary(target, data, settings.task_labels_key)
        if not labels:
            continue
        kind = target.kind
        preset = target.preset or config.preset
        background = target.background or config.background
        sentences = prompt or task_sentences(target, data)
        named = label_named_by(prompt[0], labels) if prompt and len(prompt) == 1 else None
        selected = _selected(labels, request)
        if named is not None:
            # A typed label name asks for that label alone, in semantic mode.
            semantic.setdefault((preset, background), []).append(TargetOutput(target, (named,), kind))
        elif sentences:
            # Referring mode: the sentences describe one object, returned with the label the annotator
            # selected (the control's first label when none is).
            runs.append(Run("referring", tuple(sentences), preset, background,
                            (TargetOutput(target, (selected or labels[0],), kind),)))
        elif pointed:
            # Keypoints or a rectangle alone ask for the selected label's mask, narrowed to what they pick.
            semantic.setdefault((preset, background), []).append(
                TargetOutput(target, (selected or labels[0],), kind))
        else:
            semantic.setdefault((preset, background), []).append(TargetOutput(target, labels, kind))
    for (preset, background), outputs in semantic.items():
        queries = tuple(dict.fromkeys(label.prompt for out in outputs for label in out.labels))
        runs.append(Run("semantic", queries, preset, background, tuple(outputs)))
    return runs


def _selected(labels: list[LabelSpec], request: InteractiveRequest | None) -> LabelSpec | None:
    """The target's label that the annotator's drawn regions carry, if any."""
    if request is None or request.label is None:
        return None
    return next((spec for spec in labels if spec.value == request.label), None) or label_named_by(request.label,
                                                                                                 labels)


def typed_prompt(context: Any, config: ProjectConfig) -> list[str] | None:
    """Sentences typed into the config's TextArea, from an interactive /predict's `params.context`."""
    if not isinstance(context, dict) or not config.prompt_from_name:
        return None
    sentences = []
    for item in context.get("result") or ():
        if isinstance(item, dict) and item.get("from_name") == config.prompt_from_name:
            text = (item.get("value") or {}).get("text") or ()
            sentences.extend(s.strip() for s in ([text] if isinstance(text, str) else text)
                             if isinstance(s, str) and s.strip())
    return sentences or None


class Predictor:
    def __init__(self, settings: Settings, queue: JobQueue, store: Store, metrics: Metrics, owner: str):
        self.settings = settings
        self.queue = queue
        self.store = store
        self.metrics = metrics
        self.owner = owner  # written into the claims this process wins
        self.can_post_late = configured(settings)
        self.review = ReviewStore(store.redis, settings.result_ttl)

    def predict(self, tasks: list[dict], project: Project, context: Any = None) -> list[dict]:
        started = time.monotonic()
        version = project.version
        interactive = isinstance(context, dict) and bool(context)
        prompt = typed_prompt(context, project.config) if interactive else None
        request = parse_context(context) if interactive else None
        plans = [self._plan(task, project, prompt, request) for task in tasks]
        results: dict[str, JobResult] = {}
        errors: dict[str, str] = {}
        try:
            self._collect(plans, results, errors, started, priority=interactive or len(tasks) == 1)
            entries = self._answer(plans, results, errors, version, stored=not interactive)
        except RedisError as exc:
            log.error("/predict: Redis is unavailable (%s); every unfinished task stays pending", exc)
            self.metrics.redis_errors.inc()
            # No claim can be taken, so nothing may be delivered: every task is asked for again later.
            entries = [pending_entry(version, f"the job queue is unavailable ({exc})") for _ in plans]
        for entry in entries:
            self.metrics.entries.labels(kind=_entry_kind(entry)).inc()
        self.metrics.predict_seconds.observe(time.monotonic() - started)
        return entries

    def _plan(self, task: dict, project: Project, prompt: list[str] | None,
              request: InteractiveRequest | None) -> TaskPlan:
        try:
            return plan_task(task, project, self.settings, prompt, request)
        except Exception as exc:  # one odd task must not fail the batch
            log.exception("task %s: cannot plan its jobs", task.get("id"))
            return TaskPlan(task.get("id") if isinstance(task.get("id"), int) else None,
                            failure=f"cannot read the task ({type(exc).__name__}: {exc})")

    def _collect(self, plans: list[TaskPlan], results: dict[str, JobResult], errors: dict[str, str],
                 started: float, priority: bool) -> None:
        """Fill `results` (finished keys) and `errors` (keys whose job died) until done or out of time."""
        specs = {spec.key: spec for plan in plans for spec in plan.specs}
        if not specs:
            return
        keys = list(specs)
        for key, result in zip(keys, self.store.results(keys), strict=True):
            if result is not None:
                results[key] = result
        self.metrics.cache.labels(outcome="hit").inc(len(results))
        self.metrics.cache.labels(outcome="miss").inc(len(keys) - len(results))
        jobs = {}
        for key in keys:
            if key not in results:
                jobs[key], created = self.queue.submit(specs[key], interactive=priority)
                self.metrics.jobs.labels(outcome="enqueued" if created else "deduplicated").inc()
        deadline = started + self.settings.predict_wait
        pause = POLL_FIRST_S
        waiting = list(jobs)
        while waiting and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, POLL_MAX_S)
            for key, result in zip(waiting, self.store.results(waiting), strict=True):
                if result is not None:
                    results[key] = result
            waiting = [k for k in waiting if k not in results]
            statuses = self.queue.statuses([jobs[k] for k in waiting])
            for key, status in zip(waiting, statuses, strict=True):
                if status is None or status in TERMINAL:
                    # Re-read: a job writes its result before RQ marks it finished.
                    late = self.store.results([key])[0]
                    if late is not None:
                        results[key] = late
                    else:
                        errors[key] = self.queue.failure(jobs[key]) if status else "the job disappeared"
                        log.warning("job %s for key %s ended without a result: %s", jobs[key], key[:12],
                                    errors[key])
            waiting = [k for k in waiting if k not in results and k not in errors]

    def _answer(self, plans: list[TaskPlan], results: dict[str, JobResult], errors: dict[str, str],
                version: str, stored: bool) -> list[dict]:
        def finished(plan: TaskPlan) -> bool:
            return plan.failure is not None or all(k in results for k in plan.keys)

        if stored and self.can_post_late:
            self._register_late([p for p in plans if not finished(p) and p.task_id is not None], version, results)
        claimed = [p.task_id for p in plans if stored and finished(p) and p.task_id is not None]
        won = iter(self.store.claim(claimed, version, self.owner))
        entries = []
        for plan in plans:
            if not finished(plan):
                entries.append(pending_entry(version, self._pending_reason(plan, errors)))
            elif stored and plan.task_id is not None and not next(won):
                entries.append(pending_entry(version, "this task's prediction was already delivered"))
            elif plan.failure is not None:
                entries.append(failed_entry(version, plan.failure))
            else:
                entries.append(task_entry([results[k] for k in plan.keys], version))
        delivered = sum(1 for e in entries if "result" in e)
        if delivered:
            self.metrics.deliveries.inc(delivered)
        self.review.record_delivered([(p.task_id, version, p.keys) for p, e in zip(plans, entries, strict=True)
                                      if stored and p.task_id is not None and p.specs and "result" in e])
        return entries

    def _register_late(self, plans: list[TaskPlan], version: str, results: dict[str, JobResult]) -> None:
        """Have the workers write these tasks through the API when their jobs finish."""
        if not plans:
            return
        self.store.add_late([LateRecord(p.task_id, version, tuple(p.keys)) for p in plans])
        # A job may have finished between the last look and the registration, its worker missing the
        # record: look once more, and deliver here what finished (the claim settles who delivers).
        keys = list(dict.fromkeys(k for p in plans for k in p.keys if k not in results))
        for key, result in zip(keys, self.store.results(keys), strict=True):
            if result is not None:
                results[key] = result

    def _pending_reason(self, plan: TaskPlan, errors: dict[str, str]) -> str:
        failed = [errors[k] for k in plan.keys if k in errors]
        if failed:
            return f"the job failed and will run again on the next request: {failed[0]}"
        if self.can_post_late and plan.task_id is not None:
            return "still running; the prediction will be written into Label Studio when it is ready"
        return "still running; ask again later"


def _entry_kind(entry: dict) -> str:
    if "result" not in entry:
        return "pending"
    return "result" if entry["result"] else "empty"
