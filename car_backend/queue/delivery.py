"""Writing finished late tasks into Label Studio: exactly once, in batches, retried apart from computing.

A late task (its /predict stopped waiting, or `prelabel --project` enqueued it) is a `LateRecord` on each of
its job keys (queue.ledger). When its last job finishes, `stage_ready` moves it into its project's outbox; a
`Deliverer` then writes the project's outbox, batch by batch:

1. the project's lease (`car:outbox:lease:<p>`, renewed before each call to Label Studio) makes one
   deliverer at a time write a project; a lease whose holder died expires and the next one takes over;
2. each task's delivery claim is taken (TaskState.WRITING, owner "deliver:<name>"), or taken over from a
   deliverer that died: /predict never answers a task while its write is in flight; a record whose task now
   holds a newer model_version is superseded and never written;
3. the project's label config is read from Label Studio (GET /api/projects/<id>/, once per project per
   round) and the batch's tasks are read back in one call of the project's task list
   (`LabelStudioClient.project_tasks`, which triggers no prediction: Label Studio's GET /api/tasks/<id>/
   would call this backend's /predict for a task without any prediction and wait, maybe on this very
   worker): a record is written only when that config hashes to the one that planned its jobs
   (`LateRecord.config`), the task is in that project and its data holds each predicted image under the key
   the config's Image names (else dropped, logged without URLs, counted as `deliveries:refused`): what a
   caller of /predict sent is never believed beyond what Label Studio confirms. A task that already has a
   prediction of this model_version (an earlier write whose answer was lost: a timeout, a reset after
   sending, a killed worker) counts as confirmed, unwritten;
4. the rest go in one request (`POST /api/projects/<p>/import/predictions`), or one by one
   (`POST /api/predictions/`) where Label Studio lacks the bulk endpoint (404/405);
5. only what Label Studio confirmed is marked delivered (`DeliveryLedger.confirm`) and leaves the outbox
   and the late sets.

A failed batch (Label Studio down, 5xx, timeout, refused key) keeps its claims and is tried again after
an exponential backoff with jitter (1 s doubling up to CAR_DELIVERY_RETRY_MAX), for CAR_DELIVERY_WINDOW
seconds from the first failure; the results stay cached, nothing is computed again. Due outboxes are
written by workers between jobs (worker maintenance) and right after a job finishes.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from car_backend.labelstudio.client import LabelStudioAPIError, LabelStudioClient, prediction_versions
from car_backend.labelstudio.config import config_hash
from car_backend.pipeline.compute import task_entry
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.spec import JobResult
from car_backend.queue.ledger import DeliveryLedger, LateRecord, Outcome
from car_backend.queue.results import ResultCache
from car_backend.queue.stats import CounterFamily, DeliveryOutcome, Stats
from car_backend.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
WRITING_PREFIX = "deliver:"  # names a deliverer in claims and leases
MAX_BATCHES_PER_TURN = 50  # a deliverer writes at most this many batches of a project before looking elsewhere


class DeliveryDeferred(Exception):
    """Label Studio did not take a batch now (down, 5xx, timeout, refused key): try again later."""


class LeaseLost(Exception):
    """The project's lease expired under this deliverer: the next holder takes its claims over."""


@dataclass
class BatchOutcome:
    """What one batch came to: per record, confirmed here, delivered by someone else, or dropped (reason)."""

    confirmed: list[LateRecord] = field(default_factory=list)
    elsewhere: list[LateRecord] = field(default_factory=list)
    dropped: list[tuple[LateRecord, str]] = field(default_factory=list)


def stage_ready(ledger: DeliveryLedger, results: ResultCache, key: str, now: float | None = None
                ) -> set[ProjectId]:
    """Move the late records waiting on `key` whose every job has a result into their project's outbox;
    the projects concerned. A record whose jobs ended in a pending failure (a setting or an outage) leaves
    the late sets unwritten: Label Studio asks for the task again and gets the pending answer."""
    ready: list[LateRecord] = []
    for record in ledger.late(key):
        found = results.get_many(record.keys)
        if any(r is None for r in found):
            continue  # the job finishing last stages it
        pending = [r.error or "failed" for r in found if r.pending]
        if pending:
            ledger.pend(record, pending[0])
            log.warning("task %s is not written into Label Studio: %s", record.task, pending[0])
            continue
        ready.append(record)
    outcomes = ledger.stage(ready, due=time.time() if now is None else now)
    return {r.project for r, o in zip(ready, outcomes, strict=True) if o is Outcome.WRITTEN}


def refusal(record: LateRecord, config: str, task: dict) -> str:
    """Why `record` must not be written into `task` (as read back from Label Studio) of a project whose
    label config hashes to `config` there; "" when it may. Names no URL (the reasons are logged and stored)."""
    if not record.config or record.config != config:
        return "the project's label config in Label Studio is not the one that planned the prediction"
    # the task list read back is filtered by the project; a task that names another one is refused
    if task.get("project", record.project.id) != record.project.id:
        return "the task belongs to another project in Label Studio"
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    if not record.sources or any(not isinstance(data.get(key), str) or data[key].strip() != image
                                 for key, image in record.sources):
        return "the task's data in Label Studio does not hold the predicted image under the config's key"
    return ""


class Deliverer:
    """Writes projects' outboxes into Label Studio (see the module docstring).

    `ledger`, `results`, `stats`: the Redis state; `ls`: the API client; `settings`: CAR_DELIVERY_* and
    CAR_LS_TIMEOUT; `owner`: names this deliverer in claims and leases (WRITING_PREFIX is added). Methods
    raise RedisError when Redis is unavailable; Label Studio's failures never escape (they schedule a retry).
    """

    def __init__(self, ledger: DeliveryLedger, results: ResultCache, stats: Stats, ls: LabelStudioClient,
                 settings: Settings, owner: str):
        self.ledger = ledger
        self.results = results
        self.stats = stats
        self.ls = ls
        self.settings = settings
        self.owner = owner if owner.startswith(WRITING_PREFIX) else WRITING_PREFIX + owner
        self.lease_ttl = 2 * settings.ls_timeout + 10  # longer than any one call to Label Studio
        self.instance = instance_of(settings.label_studio_url)  # the Label Studio this deliverer writes to
        self.bulk_missing = False  # this Label Studio answered 404/405 to the bulk endpoint
        self._leased: ProjectId | None = None  # the project whose lease this deliverer holds now
        self._config: str | None = None  # config_hash of the leased project's label config in Label Studio

    def deliver_due(self, now: float | None = None, projects: Iterable[ProjectId] | None = None) -> int:
        """Write every outbox that is due (or those of `projects`, unless they wait for a retry); how many
        predictions this call saw confirmed in Label Studio (written now, or found there by the read-back).
        Only projects of this deliverer's Label Studio are written: another instance's outboxes (a second
        Label Studio served from the same Redis) are left to its own workers."""
        now = time.time() if now is None else now
        if projects is None:
            chosen = self.ledger.due_projects(now, instance=self.instance)
        else:
            chosen = [p for p in projects if p.instance == self.instance and self.ledger.retry_state(p)[0] == 0]
        return sum(self.deliver_project(p) for p in chosen)

    def deliver_project(self, project: ProjectId) -> int:
        """Write project `project`'s outbox, batch by batch, if this deliverer gets its lease; the number of
        predictions confirmed here (written, or found already there)."""
        if not self.ledger.take_lease(project, self.owner, self.lease_ttl):
            return 0
        self._leased = project
        self._config = None  # read again in each round: the project's config may have changed
        written = 0
        try:
            for _ in range(MAX_BATCHES_PER_TURN):
                records = self.ledger.outbox(project, self.settings.delivery_batch)
                if not records:
                    self.ledger.set_due(project, None)
                    break
                try:
                    outcome = self._batch(project, records)
                except DeliveryDeferred as exc:
                    self._retry_later(project, str(exc))
                    break
                self._finish(project, outcome)
                written += len(outcome.confirmed)
                self.ledger.put_retry_state(project, 0, time.time())
            else:
                self.ledger.set_due(project, time.time())  # more is left: due again at once
        except LeaseLost:
            log.warning("project %s: the delivery lease expired during a call to Label Studio; the next "
                        "deliverer takes the writes over", project)
        finally:
            self._leased = None
            self.ledger.release_lease(project, self.owner)
        return written

    # -- one batch --

    def _batch(self, project: ProjectId, records: Sequence[LateRecord]) -> BatchOutcome:
        outcome = BatchOutcome()
        candidates: list[tuple[LateRecord, list[JobResult]]] = []
        for record in records:
            results = self.results.get_many(record.keys)
            if any(r is None for r in results) or any(r.pending for r in results):
                outcome.dropped.append((record, "its results expired or became a pending failure before the write"))
                continue
            claim = self.ledger.claim_for_delivery(record, self.owner)
            if claim in (Outcome.CLAIMED, Outcome.SUPERSEDED):
                outcome.elsewhere.append(record)
            else:
                candidates.append((record, results))
        to_write: list[tuple[LateRecord, list[JobResult]]] = []
        found = self._read_back(project, [record for record, _ in candidates])
        for record, results in candidates:
            verdict = self._verdict(record, found)
            if verdict == "present":
                outcome.confirmed.append(record)
            elif verdict == "write":
                to_write.append((record, results))
            else:
                outcome.dropped.append((record, verdict))
        self._write(project, to_write, outcome)
        return outcome

    def _project_config(self, project: ProjectId) -> str:
        """config_hash of `project`'s label config as Label Studio has it now (read once per round); "" when
        Label Studio does not give it (the project is gone). DeliveryDeferred for a retryable failure."""
        if self._config is None:
            self._renew()
            try:
                info = self.ls.project(project.id)
            except LabelStudioAPIError as exc:
                if exc.retryable:
                    raise DeliveryDeferred(f"reading project {project.id}'s label config: {exc}") from None
                info = {}
            xml = info.get("label_config") if isinstance(info, dict) else None
            self._config = config_hash(xml) if isinstance(xml, str) and xml.strip() else ""
        return self._config

    def _read_back(self, project: ProjectId, records: Sequence[LateRecord]) -> dict[int, dict] | str:
        """The records' tasks as Label Studio stores them, by id, in one call that triggers no prediction
        (`LabelStudioClient.project_tasks`: reading a task by its own URL would call this backend's /predict
        and could wait on this very worker); or why none can be written. Raises DeliveryDeferred when Label
        Studio cannot answer now."""
        if not records:
            return {}
        self._renew()
        try:
            return self.ls.project_tasks(project.id, [record.task for record in records])
        except LabelStudioAPIError as exc:
            if exc.retryable:
                raise DeliveryDeferred(f"reading {len(records)} tasks back: {exc}") from None
            return "refused: Label Studio could not give the tasks back"

    def _verdict(self, record: LateRecord, found: dict[int, dict] | str) -> str:
        """ "write", "present" (a prediction of this version is there), or why the task must not be written."""
        if isinstance(found, str):
            return found
        task = found.get(record.task)
        if task is None:
            problem = "Label Studio has no such task in the project (another project's, or deleted)"
        else:
            problem = refusal(record, self._project_config(record.project), task)
        if problem:
            self.stats.count(CounterFamily.DELIVERIES, DeliveryOutcome.REFUSED)
            log.warning("refused to write a prediction into task %s of project %s: %s", record.task,
                        record.project.id, problem)
            return f"refused: {problem}"
        if record.version in prediction_versions(task):
            return "present"
        return "write"

    def _write(self, project: ProjectId, to_write: list[tuple[LateRecord, list[JobResult]]],
               outcome: BatchOutcome) -> None:
        if not to_write:
            return
        bodies = [self._body(record, results) for record, results in to_write]
        if not self.bulk_missing:
            self._renew()
            try:
                self.ls.import_predictions(project.id, bodies)
            except LabelStudioAPIError as exc:
                if exc.status in (404, 405):
                    self.bulk_missing = True
                    log.info("Label Studio has no bulk prediction import (HTTP %s); writing one by one", exc.status)
                elif exc.retryable:
                    raise DeliveryDeferred(f"bulk write of {len(bodies)} predictions: {exc}") from None
                else:
                    log.warning("the bulk write was refused (%s); writing one by one to find the culprit", exc)
            else:
                outcome.confirmed.extend(record for record, _ in to_write)
                return
        for (record, _), body in zip(to_write, bodies, strict=True):
            self._renew()
            try:
                self.ls.create_prediction(record.task, body)
            except LabelStudioAPIError as exc:
                if exc.retryable:
                    self._finish(project, outcome)  # keep what was confirmed before the failure
                    outcome.confirmed.clear()
                    outcome.elsewhere.clear()
                    outcome.dropped.clear()
                    raise DeliveryDeferred(f"writing task {record.task}: {exc}") from None
                outcome.dropped.append((record, f"Label Studio refused the prediction: {exc}"))
            else:
                outcome.confirmed.append(record)

    @staticmethod
    def _body(record: LateRecord, results: list[JobResult]) -> dict:
        entry = task_entry(results, record.version)
        return {"task": record.task, "result": entry["result"], "score": entry.get("score"),
                "model_version": entry["model_version"]}

    def _renew(self) -> None:
        if self._leased is None or not self.ledger.renew_lease(self._leased, self.owner, self.lease_ttl):
            raise LeaseLost()

    # -- bookkeeping --

    def _finish(self, project: ProjectId, outcome: BatchOutcome) -> None:
        self.ledger.confirm(outcome.confirmed, self.owner)
        if outcome.confirmed:
            self.stats.count(CounterFamily.DELIVERIES, DeliveryOutcome.API, len(outcome.confirmed))
            log.info("project %s: %d predictions confirmed in Label Studio", project, len(outcome.confirmed))
        self.ledger.done(outcome.elsewhere)
        self.ledger.drop(outcome.dropped, self.owner)
        if outcome.dropped:
            self.stats.count(CounterFamily.DELIVERIES, DeliveryOutcome.DROPPED, len(outcome.dropped))

    def _retry_later(self, project: ProjectId, reason: str) -> None:
        attempt, since = self.ledger.retry_state(project)
        now = time.time()
        since = since if attempt and since is not None else now
        waited = now - since
        if waited >= self.settings.delivery_window:
            records = self.ledger.outbox(project, limit=1 << 30)
            why = f"Label Studio did not take the writes for {waited:.0f} s (CAR_DELIVERY_WINDOW): {reason}"
            log.error("project %s: giving up %d predictions: %s", project, len(records), why)
            self.stats.count(CounterFamily.DELIVERIES, DeliveryOutcome.ABANDONED, len(records))
            self.ledger.drop([(r, why) for r in records], self.owner)
            self.ledger.set_due(project, None)
            return
        delay = min(self.settings.delivery_retry_max, BACKOFF_FIRST_S * 2 ** attempt) * random.uniform(0.5, 1.0)
        self.ledger.put_retry_state(project, attempt + 1, since)
        self.ledger.set_due(project, now + delay)
        log.warning("project %s: writing into Label Studio failed (try %d, %.0f s so far): %s; next try in %.1f s",
                    project, attempt + 1, waited, reason, delay)
