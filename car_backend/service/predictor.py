"""/predict: tasks in, exactly one Label Studio entry per task out (protocol spec §3.1, §11).

1. Each task becomes one job per image it has targets on (`plan_task`).
2. Cached results are used at once; the other jobs are submitted (deduplicated by key) and the request
   waits for them up to CAR_PREDICT_WAIT.
3. Tasks whose jobs all finished are delivered here, each only if this request wins the task's delivery
   claim for this (model version, job keys) (so a task is never delivered twice, whatever overlaps); a
   permanent failure (of planning or of a job) is answered as an empty prediction (Label Studio stores it
   and stops asking) and takes no claim: only a prediction actually answered claims its task.
4. Other tasks get a pending entry (no `result`: Label Studio stores nothing and asks again). They are
   registered as late, so the worker finishing their job writes the prediction through the API.
5. A task whose job failed for a reason a setting or an outage can change (a pending failure: host not
   allowed, size limit, 401/403/5xx, timeout, a storage's 403/404) gets a pending entry with the reason, never an empty
   prediction; the failure is cached at most CAR_PENDING_TTL seconds, and only under the same settings.

The answer is never later than promised: waiting stops early enough (ANSWER_RESERVE_S, plus
ANSWER_S_PER_TASK per task) to assemble it within CAR_PREDICT_WAIT of the request's start; jobs that could
not be queued by then (a huge request) are answered pending, to be queued by the next request. A call does not
wait at all (its jobs are queued, its tasks answered pending with the reason) when no worker is alive, or
when CAR_PREDICT_WAITERS calls are waiting already, so waiting calls never take every HTTP thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import RedisError

from car_backend.labelstudio.interactive import InteractiveRequest, parse_context
from car_backend.labelstudio.results import failed_entry, pending_entry
from car_backend.pipeline.compute import task_entry
from car_backend.pipeline.planning import TaskPlan, plan_task, typed_prompt
from car_backend.pipeline.spec import JobResult, Project
from car_backend.queue.jobqueue import JobQueue
from car_backend.queue.ledger import LateRecord, TaskState
from car_backend.queue.state import RedisState
from car_backend.queue.wait import JobWatch
from car_backend.service.metrics import Metrics
from car_backend.settings import Settings

log = logging.getLogger(__name__)

# Time kept for building the answer after the wait (claims, entries, delivery marks, JSON): a fixed part and
# a part per task (measured about 0.1 ms per task on 2 loaded cores; 5x margin).
ANSWER_RESERVE_S = 0.5
ANSWER_S_PER_TASK = 0.0005
# Jobs are queued for at least this long whatever CAR_PREDICT_WAIT (0 = answer without waiting, yet queue).
QUEUE_AT_LEAST_S = 2.0
# Why a finished task is answered pending: the state of whoever holds its claim (DeliveryLedger.state_of).
LOST_CLAIM = {TaskState.WRITING: "this task's prediction is being written into Label Studio (already delivered "
                                 "once the write is confirmed)",
              TaskState.DELIVERED: "this task's prediction was already delivered",
              TaskState.EMPTY: "this task's prediction was already delivered (empty: the image cannot be used)"}
NO_WORKER = "no worker is running (start `car-backend worker`); the job is queued and runs when one starts"
NOT_QUEUED = "not queued: this request had more jobs than can be queued within CAR_PREDICT_WAIT"
BUSY = ("the server has {n} /predict calls waiting for jobs already (CAR_PREDICT_WAITERS); the job is queued "
        "and did not wait")


class Predictor:
    """Answers /predict calls (see the module docstring); one per server process, shared by its threads.

    `queue`, `state`: the process's job queue and Redis state (one Redis client); `metrics`: where calls are
    counted; `owner`: written into the delivery claims this process wins; `workers_available()`: whether a
    worker can run jobs now (Backend.workers_available; default: always).
    """

    def __init__(self, settings: Settings, queue: JobQueue, state: RedisState, metrics: Metrics, owner: str,
                 workers_available: Callable[[], bool] | None = None):
        self.settings = settings
        self.queue = queue
        self.state = state
        self.metrics = metrics
        self.owner = owner
        self.can_post_late = settings.can_write_predictions
        self.pending_failures = PendingFailures()
        self.workers_available = workers_available or (lambda: True)
        self._waiters = threading.BoundedSemaphore(settings.waiting_predicts)

    def predict(self, tasks: list[dict], project: Project, context: Any = None) -> list[dict]:
        """One entry per task, in order: a prediction (`result`, possibly empty for a permanent failure) or
        a pending entry (no `result`: Label Studio asks again). Never raises for one bad task; a Redis
        outage makes every entry pending."""
        started = time.monotonic()
        version = project.version
        interactive = isinstance(context, dict) and bool(context)
        prompt = typed_prompt(context, project.config) if interactive else None
        request = parse_context(context) if interactive else None
        plans = [self._plan(task, project, prompt, request) for task in tasks]
        results: dict[str, JobResult] = {}
        errors: dict[str, str] = {}
        try:
            not_waited = self._collect(plans, results, errors, started, priority=interactive or len(tasks) == 1)
            entries = self._answer(plans, results, errors, project, stored=not interactive,
                                   not_waited=not_waited)
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
                 started: float, priority: bool) -> str | None:
        """Fill `results` (finished keys) and `errors` (keys whose job died) until done or out of time; the
        reason when the call did not wait (no live worker, too many calls waiting), else None."""
        specs = {spec.key: spec for plan in plans for spec in plan.specs}
        if not specs:
            return None
        keys = list(specs)
        for key, result in zip(keys, self.state.results.get_many(keys), strict=True):
            if result is not None:
                results[key] = result
        self.metrics.cache.labels(outcome="hit").inc(len(results))
        self.metrics.cache.labels(outcome="miss").inc(len(keys) - len(results))
        # Waiting, and queueing too, end early enough to build the answer in time; a short wait still queues.
        deadline = started + self.settings.predict_wait - ANSWER_RESERVE_S - ANSWER_S_PER_TASK * len(plans)
        watch = JobWatch(self.queue, self.state.results)
        missing = [k for k in keys if k not in results]
        created = watch.submit_many([specs[k] for k in missing], interactive=priority,
                                    deadline=max(deadline, started + QUEUE_AT_LEAST_S))
        self.metrics.jobs.labels(outcome="enqueued").inc(created)
        self.metrics.jobs.labels(outcome="deduplicated").inc(len(watch.jobs) - created)
        unqueued = [k for k in missing if k not in watch.jobs]
        if unqueued:
            log.warning("/predict: %d of %d jobs not queued: no time left within CAR_PREDICT_WAIT", len(unqueued),
                        len(missing))
            errors.update(dict.fromkeys(unqueued, NOT_QUEUED))
        if not watch.jobs:
            return None
        if not self.workers_available():
            return NO_WORKER
        if not self._waiters.acquire(blocking=False):
            return BUSY.format(n=self.settings.waiting_predicts)
        try:
            settled = watch.wait(list(watch.jobs), deadline=deadline)
        finally:
            self._waiters.release()
        results.update(settled.results)
        errors.update(settled.failed)
        return None

    def _answer(self, plans: list[TaskPlan], results: dict[str, JobResult], errors: dict[str, str],
                project: Project, stored: bool, not_waited: str | None = None) -> list[dict]:
        """One entry per plan. Stored calls with a project go through the delivery ledger: unfinished tasks
        are registered for a late write, and a finished prediction is answered only where this call wins the
        task's claim for this (version, keys). A planning failure, a failed job and a pending answer take no
        claim: only a prediction actually answered does."""
        version, pid = project.version, project.project
        ledgered = stored and pid is not None
        if ledgered and self.can_post_late:
            self._register_late([p for p in plans if not _finished(p, results) and p.task_id is not None],
                                project, results)
        answers: dict[int, tuple[dict, TaskState]] = {}  # plan index -> (entry, state)
        entries: list[dict | None] = []
        for plan in plans:
            blocked = _pending_failure(plan, results) if _finished(plan, results) else None
            if not _finished(plan, results):
                entries.append(pending_entry(version, self._pending_reason(plan, errors, not_waited)))
            elif blocked is not None:
                self.pending_failures.note(blocked)
                entries.append(pending_entry(version, f"not predicted for a reason a setting or an outage can "
                                                      f"change (asked again, it is tried again): {blocked}"))
                if ledgered and plan.task_id is not None:
                    self.state.ledger.settle(pid, [(plan.task_id, version, plan.keys, TaskState.PENDING, blocked)],
                                             config=project.label_hash)
            elif plan.failure is not None:
                entries.append(failed_entry(version, plan.failure))
            else:
                found = [results[k] for k in plan.keys]
                entry = task_entry(found, version)
                if ledgered and plan.task_id is not None and all(r.ok for r in found):
                    answers[len(entries)] = (entry, TaskState.DELIVERED if entry["result"] else TaskState.EMPTY)
                    entries.append(None)
                else:
                    entries.append(entry)
        claimed = list(answers)
        won = self.state.ledger.answer(pid, [(plans[i].task_id, version, plans[i].keys, answers[i][1], "")
                                             for i in claimed], self.owner, config=project.label_hash) \
            if claimed else []
        lost = [index for index, ok in zip(claimed, won, strict=True) if not ok]
        holders = self.state.ledger.state_of(pid, [plans[i].task_id for i in lost]) if lost else {}
        for index, ok in zip(claimed, won, strict=True):
            holder = holders.get(plans[index].task_id)
            entries[index] = answers[index][0] if ok else pending_entry(version, LOST_CLAIM.get(
                holder.state if holder is not None else None, LOST_CLAIM[TaskState.DELIVERED]))
        delivered = sum(1 for e in entries if "result" in e)
        if delivered:
            self.metrics.deliveries.inc(delivered)
        return entries

    def _register_late(self, plans: list[TaskPlan], project: Project, results: dict[str, JobResult]) -> None:
        """Have the workers write these tasks through the API when their jobs finish."""
        if not plans:
            return
        self.state.ledger.register_late([LateRecord(p.task_id, project.version, tuple(p.keys), project.project,
                                                    tuple(dict.fromkeys(spec.image for spec in p.specs)),
                                                    config=project.label_hash, sources=tuple(p.sources))
                                         for p in plans])
        # A job may have finished between the last look and the registration, its worker missing the
        # record: look once more, and deliver here what finished (the claim settles who delivers).
        keys = list(dict.fromkeys(k for p in plans for k in p.keys if k not in results))
        for key, result in zip(keys, self.state.results.get_many(keys), strict=True):
            if result is not None:
                results[key] = result

    def _pending_reason(self, plan: TaskPlan, errors: dict[str, str], not_waited: str | None = None) -> str:
        failed = [errors[k] for k in plan.keys if k in errors]
        if failed:
            return f"the job failed and will run again on the next request: {failed[0]}"
        if not_waited:
            late = "; the prediction will be written into Label Studio when it is ready" \
                if self.can_post_late and plan.task_id is not None else "; ask again later"
            return not_waited + late
        if self.can_post_late and plan.task_id is not None:
            return "still running; the prediction will be written into Label Studio when it is ready"
        return "still running; ask again later"


def _finished(plan: TaskPlan, results: dict[str, JobResult]) -> bool:
    return plan.failure is not None or all(k in results for k in plan.keys)


def _pending_failure(plan: TaskPlan, results: dict[str, JobResult]) -> str | None:
    """Why a finished task cannot be answered now: a setting refused it while planning, or a setting or an
    outage failed one of its jobs."""
    if plan.pending is not None:
        return plan.pending
    found = [results[k].error or "failed" for k in plan.keys if k in results and results[k].pending]
    return found[0] if found else None


@dataclass(frozen=True)
class PendingCount:
    """Entries answered pending because a setting or an outage failed their job, and the last reason."""

    count: int
    last_reason: str


@dataclass
class PendingFailures:
    """The running count of such entries in this process (shown by /health)."""

    count: int = 0
    last_reason: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, reason: str) -> None:
        with self._lock:
            self.count += 1
            self.last_reason = reason[:300]

    def snapshot(self) -> PendingCount:
        with self._lock:
            return PendingCount(self.count, self.last_reason)


def _entry_kind(entry: dict) -> str:
    if "result" not in entry:
        return "pending"
    return "result" if entry["result"] else "empty"
