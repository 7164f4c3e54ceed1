"""`GET /status?project=ID[&task=ID]` and `car-backend status --project ID`: where a project's tasks are.

Every task /predict answered or registered as late (and every `prelabel --project` task) is tracked in
`car:tasks:<project>` (queue.store.Store.track). Its state is read back with what Redis holds now:

- queued / running: a job of the task has no result yet and is waiting / being executed;
- failed: a job ended without a result, or with a pending failure (a setting or an outage), or the
  prediction was dropped (refused by the read-back check, given up after CAR_DELIVERY_WINDOW); with reasons;
- done: every job of the task has a result (a prediction, or a permanent failure);
- delivered: Label Studio has the prediction (answered by /predict, or confirmed after an API write);
  `empty` of those are empty predictions for permanent failures (the image cannot be decoded, ...);
- waiting_to_be_written: done, not yet confirmed written through the API (in the outbox, or retrying).

`fit` is the project's mask-head training status (review.heads.fit_status: progress, figures, the adopted
generation), None before any training was queued.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from car_backend.queue.connection import redis_client
from car_backend.queue.jobqueue import JobQueue, make_store
from car_backend.queue.store import Store
from car_backend.review.heads import fit_status
from car_backend.settings import Settings

MAX_LISTED_FAILURES = 100
QUEUED = {"queued", "deferred", "scheduled"}


def project_status(store: Store, queue: JobQueue, project: int, task: int | None = None) -> dict[str, Any]:
    """Counts per state for `project` (see the module docstring) and up to MAX_LISTED_FAILURES failures with
    their reasons; with `task`, that task's row only (`tasks`: [] when it is not tracked). Raises RedisError."""
    tracked = store.tracked(project, task)
    task_ids = sorted(tracked)
    in_outbox = dict(zip(task_ids, store.in_outbox(project, task_ids), strict=True))
    rows = [_row(store, queue, tid, tracked[tid], in_outbox[tid]) for tid in task_ids]
    if task is not None:
        return {"project": project, "tasks": rows}
    counts = {name: sum(1 for r in rows if r[name]) for name in
              ("queued", "running", "done", "failed", "delivered", "empty", "waiting_to_be_written")}
    failures = [{"task": r["task"], "reason": r["reason"]} for r in rows if r["failed"]][:MAX_LISTED_FAILURES]
    return {"project": project, "total": len(rows), **counts, "failures": failures,
            "fit": fit_status(store.redis, str(project))}


def _row(store: Store, queue: JobQueue, task: int, info: dict, in_outbox: bool) -> dict[str, Any]:
    keys, version, state, reason = info["keys"], info["version"], info["state"], info.get("reason", "")
    results = store.results(keys)
    missing = [k for k, r in zip(keys, results, strict=True) if r is None]
    pending = [r.error for r in results if r is not None and r.pending]
    claim = store.delivery_states([task], version)[0]
    row = {"task": task, "model_version": version, "state": state, "reason": reason, "queued": False,
           "running": False, "done": not missing and not pending, "failed": False, "delivered": False,
           "empty": False, "waiting_to_be_written": False}
    if state in ("delivered", "empty") or claim == "delivered":
        row["delivered"] = True
        row["state"] = "delivered"
        permanent = [r.error or "" for r in results if r is not None and not r.ok and not r.pending]
        row["empty"] = state == "empty" or (not missing and bool(permanent) and len(permanent) == len(results))
        if row["empty"] and not reason:
            row["reason"] = "; ".join(permanent)
    elif state in ("pending", "dropped") or pending:
        row["failed"] = True
        row["reason"] = reason or (pending[0] if pending else "")
    elif missing:
        statuses = queue.statuses([j for j in store.job_ids(missing) if j is not None])
        if any(s == "started" for s in statuses):
            row["running"] = True
        elif any(s in QUEUED for s in statuses):
            row["queued"] = True
        else:
            row["failed"] = True
            row["reason"] = "its job ended without a result; the next request for the task submits it again"
    else:
        row["waiting_to_be_written"] = in_outbox or state == "late"
    return row


def main(args: argparse.Namespace, settings: Settings) -> int:
    """`car-backend status --project ID [--task ID]`: prints the JSON /status would answer."""
    if not settings.redis_url:
        print("car-backend status needs REDIS_URL (the queue's Redis); with an embedded Redis, ask the running "
              "server: GET /status?project=ID", file=sys.stderr)
        return 2
    redis = redis_client(settings.redis_url, "cli")
    try:
        store = make_store(redis, settings)
        print(json.dumps(project_status(store, JobQueue(settings, redis, store), args.project, args.task), indent=2))
    finally:
        redis.close()
    return 0
