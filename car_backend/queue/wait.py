"""Waiting for jobs: the one helper /predict and `prelabel --project` both follow their jobs with.

A `JobWatch` submits the jobs of some keys (deduplicated by the queue), then `poll` says which keys have a
result now and which jobs ended without one (failed after their retries, or vanished), and `wait` polls
with a growing pause until every key is settled or a deadline passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from car_backend.pipeline.spec import JobResult, JobSpec
from car_backend.queue.jobqueue import TERMINAL, JobQueue
from car_backend.queue.results import ResultCache

log = logging.getLogger(__name__)

POLL_FIRST_S = 0.05
POLL_MAX_S = 0.5


@dataclass
class Settled:
    """What a poll found: results by key, and the reason for each key whose job ended without one."""

    results: dict[str, JobResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class JobWatch:
    """Jobs submitted for keys, followed until each key has a result or its job is over.

    `queue` and `results` wrap the process's Redis client; every method raises RedisError when it is down.
    """

    def __init__(self, queue: JobQueue, results: ResultCache):
        self.queue = queue
        self.results = results
        self.jobs: dict[str, str] = {}  # key -> RQ job id

    def submit(self, spec: JobSpec, interactive: bool = False) -> bool:
        """Make sure a job computes `spec.key`; True when a new job was created (else a live one is joined)."""
        self.jobs[spec.key], created = self.queue.submit(spec, interactive=interactive)
        return created

    def submit_many(self, specs: Sequence[JobSpec], interactive: bool = False, deadline: float | None = None) -> int:
        """`submit` for specs of distinct keys, in a few transactions (JobQueue.submit_many); how many jobs
        were created. Past `deadline` the rest is not submitted (those keys are not in `jobs`)."""
        created = 0
        for spec, (job_id, new) in zip(specs, self.queue.submit_many(list(specs), interactive=interactive,
                                                                     deadline=deadline), strict=False):
            self.jobs[spec.key] = job_id
            created += new
        return created

    def poll(self, keys: Sequence[str]) -> Settled:
        """The keys of `keys` that have a result now, and those whose job ended without one. Settled keys are
        no longer followed (their job ids are forgotten), so each failure is looked up and logged once."""
        settled = Settled()
        keys = list(keys)
        for key, result in zip(keys, self.results.get_many(keys), strict=True):
            if result is not None:
                settled.results[key] = result
        followed = [k for k in keys if k not in settled.results and k in self.jobs]
        status_of = dict(zip(followed, self.queue.statuses([self.jobs[k] for k in followed]), strict=True))
        ended = [k for k in followed if status_of[k] is None or status_of[k] in TERMINAL]
        # Re-read: a job writes its result before RQ marks it finished.
        for key, result in zip(ended, self.results.get_many(ended), strict=True):
            if result is not None:
                settled.results[key] = result
                continue
            settled.failed[key] = self.queue.failure(self.jobs[key]) if status_of[key] else "the job disappeared"
            log.warning("job %s for key %s ended without a result: %s", self.jobs[key], key[:12],
                        settled.failed[key])
        for key in (*settled.results, *settled.failed):
            self.jobs.pop(key, None)
        return settled

    def wait(self, keys: Sequence[str], deadline: float) -> Settled:
        """Poll `keys` (pausing 50 ms, growing to 0.5 s) until each is settled or `deadline` (monotonic)."""
        settled = Settled()
        waiting = list(keys)
        pause = POLL_FIRST_S
        while waiting and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, POLL_MAX_S)
            found = self.poll(waiting)
            settled.results.update(found.results)
            settled.failed.update(found.failed)
            waiting = [k for k in waiting if k not in settled.results and k not in settled.failed]
        return settled
