"""JobWatch, the job-wait helper of /predict and prelabel, on the real Redis (no worker: the test settles jobs)."""

from __future__ import annotations

import logging
import time

from rq.job import Job

from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobResult
from car_backend.queue.jobqueue import SERIALIZER, JobQueue
from car_backend.queue.state import RedisState
from car_backend.queue.wait import JobWatch
from car_backend.review.store import ReviewStore
from car_backend.service.projects import Projects
from tests.support.label_configs import label_config
from tests.support.settings import tiny_settings


def _watch_two_jobs(redis, redis_url, task_ids):
    settings = tiny_settings(redis_url=redis_url, queue=f"q-{task_ids(1)[0]}")
    state = RedisState.on(redis, settings)
    watch = JobWatch(JobQueue(settings, redis, state.locks), state.results)
    project = Projects(settings, state.projects, ReviewStore(redis)).setup(None, label_config("brush"), None)
    specs = [plan_task({"id": t, "data": {"image": f"http://h/wait-{t}.png"}}, project, settings).specs[0]
             for t in task_ids(2)]
    assert all(watch.submit(spec) for spec in specs)
    return state.results, watch, [spec.key for spec in specs]


def test_poll_reports_results_and_ended_jobs_once(redis, redis_url, task_ids, caplog):
    results, watch, (done, dead) = _watch_two_jobs(redis, redis_url, task_ids)
    assert watch.poll([done, dead]).results == {}  # both queued, nothing settled
    results.put(done, JobResult(ok=True, regions=[], score=0.5))
    Job.fetch(watch.jobs[dead], connection=redis, serializer=SERIALIZER).set_status("failed")
    caplog.set_level(logging.WARNING, logger="car_backend.queue.wait")
    first = watch.poll([done, dead])
    assert set(first.results) == {done} and set(first.failed) == {dead}
    assert watch.jobs == {}  # settled keys are no longer followed
    second = watch.poll([done, dead])
    assert set(second.results) == {done} and second.failed == {}  # the result is still read; no new failure
    assert sum("ended without a result" in r.message for r in caplog.records) == 1


def test_wait_stops_at_its_deadline(redis, redis_url, task_ids):
    _, watch, keys = _watch_two_jobs(redis, redis_url, task_ids)
    started = time.monotonic()
    settled = watch.wait(keys, deadline=started + 0.3)
    assert settled.results == {} and settled.failed == {}
    assert 0.25 <= time.monotonic() - started < 2.0
