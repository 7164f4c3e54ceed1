"""`GET /status?project=ID[&task=ID]` and `car-backend status --project ID`: where a project's tasks are.

Every task /predict answered or registered as late (and every `prelabel --project` task) has an entry in the
delivery ledger (queue.ledger). `task_progress` reads it with what Redis holds now, in a constant number of
Redis round trips whatever the number of tasks (the ledger's entries, their results, the job locks of
unfinished keys, those jobs' RQ statuses):

- queued / running: a job of the task has no result yet and is waiting / being executed;
- failed: a job ended without a result, or with a pending failure (a setting or an outage), or the
  prediction was dropped (refused by the read-back check, given up after CAR_DELIVERY_WINDOW); with reasons;
- done: every job of the task has a result (a prediction, or a permanent failure);
- delivered: Label Studio has the prediction (answered by /predict, or confirmed after an API write);
  `empty` of those are empty predictions for permanent failures (the image cannot be decoded, ...);
- waiting_to_be_written: done, not yet confirmed written through the API (in the outbox, or retrying).

`fit` is the project's mask-head training status (review.store.FitStatus), None before any training;
`calibration` its thresholds' calibration (review.store.Calibration: `reason` says why the last one tried
nothing, e.g. out of memory), None before any.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum

from rq.job import JobStatus

from car_backend.pipeline.identity import ProjectId
from car_backend.queue.connection import redis_client
from car_backend.queue.jobqueue import JobQueue
from car_backend.queue.ledger import TaskEntry, TaskState
from car_backend.queue.state import RedisState
from car_backend.review.report import cli_project
from car_backend.review.store import Calibration, FitStatus, ReviewStore
from car_backend.settings import Settings

MAX_LISTED_FAILURES = 100
QUEUED = frozenset({JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED})


class Progress(str, Enum):
    """Where a task is, as /status counts it."""

    QUEUED = "queued"
    RUNNING = "running"
    FAILED = "failed"
    DONE = "done"
    WAITING_TO_BE_WRITTEN = "waiting_to_be_written"
    DELIVERED = "delivered"


@dataclass(frozen=True)
class TaskProgress:
    """One task: its ledger state and version, where it is (`progress`), whether every job has a result
    (`done`), whether its delivered prediction is empty, and why it failed or is empty (`reason`)."""

    task: int
    model_version: str
    state: TaskState
    progress: Progress
    done: bool
    empty: bool = False
    reason: str = ""


@dataclass(frozen=True)
class ProjectProgress:
    """Counts per progress of a project's tracked tasks, up to MAX_LISTED_FAILURES failures, the mask head's
    status; with a task asked for, that task's row only (`tasks`)."""

    project: str
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    fit: FitStatus | None = None
    tasks: list[TaskProgress] | None = None
    calibration: Calibration | None = None

    def to_dict(self) -> dict:
        """The JSON /status answers."""
        if self.tasks is not None:
            rows = []
            for row in self.tasks:
                flags = {p.value: row.progress is p for p in Progress}
                flags["done"] = row.done
                rows.append({"task": row.task, "model_version": row.model_version, "state": row.state.value,
                             "reason": row.reason, **flags, "empty": row.empty})
            return {"project": self.project, "tasks": rows}
        return {"project": self.project, "total": self.total, **self.counts, "failures": self.failures,
                "fit": asdict(self.fit) if self.fit is not None else None,
                "calibration": asdict(self.calibration) if self.calibration is not None else None}


def task_progress(state: RedisState, queue: JobQueue, project: ProjectId,
                  tasks: list[int] | None = None) -> list[TaskProgress]:
    """The progress of `tasks` (every tracked task of the project with None), by task; tasks the ledger does
    not know are left out. Four Redis round trips at most. Raises RedisError."""
    entries = state.ledger.state_of(project, tasks)
    ordered = [entries[t] for t in sorted(entries)]
    keys = list(dict.fromkeys(k for e in ordered for k in e.keys))
    results = dict(zip(keys, state.results.get_many(keys), strict=True))
    missing = [k for k in keys if results[k] is None]
    job_ids = dict(zip(missing, state.locks.job_ids(missing), strict=True))
    named = [j for j in job_ids.values() if j is not None]
    statuses = dict(zip(named, queue.statuses(named), strict=True))
    return [_progress(e, results, {k: statuses.get(job_ids[k]) if job_ids.get(k) else None
                                   for k in e.keys if results[k] is None}) for e in ordered]


def _progress(entry: TaskEntry, results: dict, unfinished: dict[str, JobStatus | None]) -> TaskProgress:
    found = [results[k] for k in entry.keys if results[k] is not None]
    pending = [r.error or "" for r in found if r.pending]
    done = not unfinished and not pending
    if entry.state.delivered:
        permanent = [r.error or "" for r in found if not r.ok and not r.pending]
        empty = entry.state is TaskState.EMPTY or (done and bool(permanent) and len(permanent) == len(entry.keys))
        reason = entry.reason or ("; ".join(permanent) if empty else "")
        return TaskProgress(entry.task, entry.version, entry.state, Progress.DELIVERED, done, empty, reason)
    if entry.state in (TaskState.PENDING, TaskState.DROPPED) or pending:
        return TaskProgress(entry.task, entry.version, entry.state, Progress.FAILED, done,
                            reason=entry.reason or (pending[0] if pending else ""))
    if unfinished:
        statuses = set(unfinished.values())
        if JobStatus.STARTED in statuses:
            return TaskProgress(entry.task, entry.version, entry.state, Progress.RUNNING, done)
        if statuses & QUEUED:
            return TaskProgress(entry.task, entry.version, entry.state, Progress.QUEUED, done)
        return TaskProgress(entry.task, entry.version, entry.state, Progress.FAILED, done,
                            reason="its job ended without a result; the next request for the task submits it again")
    return TaskProgress(entry.task, entry.version, entry.state, Progress.WAITING_TO_BE_WRITTEN, done)


def project_status(state: RedisState, queue: JobQueue, review: ReviewStore, project: ProjectId,
                   task: int | None = None) -> ProjectProgress:
    """The project's progress (see the module docstring); with `task`, that task's row only (`tasks`: [] when
    it is not tracked). Raises RedisError."""
    rows = task_progress(state, queue, project, [task] if task is not None else None)
    if task is not None:
        return ProjectProgress(str(project), tasks=rows)
    counts = {p.value: sum(1 for r in rows if r.progress is p) for p in Progress}
    counts["done"] = sum(1 for r in rows if r.done)
    counts["empty"] = sum(1 for r in rows if r.empty)
    failures = [{"task": r.task, "reason": r.reason} for r in rows if r.progress is Progress.FAILED]
    fit, calibration = review.fit_and_calibration(project)
    return ProjectProgress(str(project), len(rows), counts, failures[:MAX_LISTED_FAILURES], fit,
                           calibration=calibration)


def main(args: argparse.Namespace, settings: Settings) -> int:
    """`car-backend status --project ID [--task ID]`: prints the JSON /status would answer."""
    if not settings.redis_url:
        print("car-backend status needs REDIS_URL (the queue's Redis); with an embedded Redis, ask the running "
              "server: GET /status?project=ID", file=sys.stderr)
        return 2
    redis = redis_client(settings.redis_url, "cli")
    try:
        state = RedisState.on(redis, settings)
        progress = project_status(state, JobQueue(settings, redis, state.locks), ReviewStore(redis),
                                  cli_project(redis, settings, args.project), args.task)
        print(json.dumps(progress.to_dict(), indent=2, default=str))
    finally:
        redis.close()
    return 0
