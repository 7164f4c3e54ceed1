"""Nothing car-backend writes to Redis is a pickle, and what an older version pickled there breaks nothing.

RQ job data (JSONSerializer) and stored corrections are JSON; a pickled correction is skipped with a warning,
and a pickled RQ job is failed when dequeued while the worker goes on with the next job.
"""

from __future__ import annotations

import json
import logging
import pickle
import signal
import uuid
import zlib

import numpy as np
from rq import Queue, Retry
from rq.job import Job

from car_backend.pipeline.identity import ProjectId
from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobResult, JobSpec
from car_backend.queue.jobqueue import JobName, JobQueue
from car_backend.queue.state import RedisState
from car_backend.review.store import Correction, ReviewStore
from car_backend.review.webhook import AnnotationEvent
from car_backend.service.projects import Projects
from car_backend.worker import tasks
from car_backend.worker.context import WorkerContext
from car_backend.worker.process import CarWorker, make_worker
from tests.support.label_configs import label_config
from tests.support.settings import tiny_settings

CREATED = 1700000000


def _queue(redis, redis_url):
    settings = tiny_settings(redis_url=redis_url, queue=f"nopickle-{uuid.uuid4().hex[:8]}")
    state = RedisState.on(redis, settings)
    return settings, state, JobQueue(settings, redis, state.locks)


def _spec(settings, state, task_id: int = 1) -> JobSpec:
    """A job of its own: an image URL no other test submits, so that its key is new to the queue."""
    project = Projects(settings, state.projects, ReviewStore(state.redis)).setup(None, label_config("brush"), None)
    image = f"http://h/nopickle-{uuid.uuid4().hex}.png"
    return plan_task({"id": task_id, "data": {"image": image}}, project, settings).specs[0]


def _job_data(redis, job_id: str) -> list:
    """The raw `data` field of an RQ job hash, read as JSON: [func_name, instance, args, kwargs]."""
    raw = redis.hget(Job.key_for(job_id), "data")
    assert raw is not None, f"no job hash for {job_id}"
    data = json.loads(zlib.decompress(raw))  # RQ stores data zlib-compressed
    assert isinstance(data, list) and len(data) == 4
    return data


def _project() -> ProjectId:
    """A project of its own: an id no other test uses (review keys are per ProjectId)."""
    return ProjectId("local", 10**9 + uuid.uuid4().int % 10**9, CREATED)


def _correction(task: int, spec: JobSpec) -> Correction:
    rng = np.random.default_rng(task)
    return Correction(task, (spec,), {"cat": rng.random((37, 53)) > 0.5, "dog": np.zeros((5, 3), dtype=bool)})


def test_a_submitted_job_is_json(redis, redis_url):
    settings, state, queue = _queue(redis, redis_url)
    spec = _spec(settings, state)
    job_id, created = queue.submit(spec)
    assert created
    func, instance, args, kwargs = _job_data(redis, job_id)
    assert func == JobName.SEGMENT.value == f"{tasks.segment.__module__}.{tasks.segment.__name__}"
    assert instance is None and kwargs == {}
    assert args == [spec.to_dict()]
    assert JobSpec.from_dict(args[0]).key == spec.key


def _review_call(redis, redis_url) -> tuple[AnnotationEvent, list]:
    """A review job submitted as the webhook does; (its event, the job's JSON args)."""
    settings, state, queue = _queue(redis, redis_url)
    spec = _spec(settings, state, task_id=7)
    event = AnnotationEvent(_project(), 7, 70, "0" * 64, (spec,))
    job_id = queue.submit_call(JobName.REVIEW, (event.to_dict(),), description="review 7")
    func, _, args, _ = _job_data(redis, job_id)
    assert func == JobName.REVIEW.value == f"{tasks.review.__module__}.{tasks.review.__name__}"
    return event, args


def test_a_submitted_review_call_is_json(redis, redis_url):
    event, args = _review_call(redis, redis_url)
    assert args == [event.to_dict()]
    assert [JobSpec.from_dict(s).key for s in args[0]["specs"]] == [s.key for s in event.specs]


def test_a_submitted_review_call_reads_back_as_its_event(redis, redis_url):
    """What the worker does with it: the review job (worker.tasks.review) runs AnnotationEvent.from_dict on it."""
    event, args = _review_call(redis, redis_url)
    back = AnnotationEvent.from_dict(args[0])
    assert back == event and back.specs[0].key == event.specs[0].key


def test_a_stored_correction_is_json_and_round_trips(redis, redis_url):
    settings, state, _ = _queue(redis, redis_url)
    spec = _spec(settings, state, task_id=11)
    review = ReviewStore(redis)
    project = _project()
    original = _correction(11, spec)
    assert review.put_correction(project, original) == 1
    raw = redis.hget(ReviewStore.CORRECTIONS.key(project.key), "11")
    stored = json.loads(raw)  # the raw Redis value, as it is
    assert stored["task"] == 11 and stored["specs"] == [spec.to_dict()]
    assert {label: m["shape"] for label, m in stored["masks"].items()} == {"cat": [37, 53], "dog": [5, 3]}
    (back,) = review.corrections(project)
    assert back.task == 11 and [s.key for s in back.specs] == [spec.key]
    assert set(back.masks) == set(original.masks)
    for label, mask in original.masks.items():
        assert back.masks[label].dtype == bool and back.masks[label].shape == mask.shape
        assert np.array_equal(back.masks[label], mask)
    # the count calibration is triggered by: corrected tasks, an updated one counted once
    assert review.put_correction(project, _correction(11, spec)) == 1
    assert review.put_correction(project, _correction(12, spec)) == 2


def test_a_pickled_correction_is_skipped_with_a_warning(redis, redis_url, caplog):
    settings, state, _ = _queue(redis, redis_url)
    spec = _spec(settings, state, task_id=21)
    review = ReviewStore(redis)
    project = _project()
    review.put_correction(project, _correction(22, spec))
    # what the previous version stored: zlib.compress(pickle.dumps(correction))
    redis.hset(ReviewStore.CORRECTIONS.key(project.key), "21", zlib.compress(pickle.dumps(_correction(21, spec))))
    with caplog.at_level(logging.WARNING, logger="car_backend.review.store"):
        found = review.corrections(project)
    assert [c.task for c in found] == [22]
    warnings = [r for r in caplog.records if r.name == "car_backend.review.store" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(project) in warnings[0].getMessage() and "21" in warnings[0].getMessage()


def test_a_pickled_rq_job_does_not_stop_a_worker(redis, redis_url, caplog):
    settings, state, queue = _queue(redis, redis_url)
    # A job as the previous version queued it: RQ's default (pickle) serializer, with retries.
    old = Queue(queue.batch.name, connection=redis).enqueue("os.getcwd", retry=Retry(max=2), failure_ttl=600)
    assert redis.hget(Job.key_for(old.id), "data") is not None
    # The job after it: a segment job (only JobName jobs run now) whose result is cached, so it runs at once.
    spec = _spec(settings, state, task_id=41)
    state.results.put(spec.key, JobResult(ok=True, regions=[], score=0.5, seconds=0.5))
    new_id = queue.submit_call(JobName.SEGMENT, (spec.to_dict(),), description="cached", timeout=30)
    assert queue.batch.job_ids == [old.id, new_id]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    name = f"nopickle-{uuid.uuid4().hex[:8]}"
    worker = make_worker(CarWorker, settings, redis, name)
    tasks.install(WorkerContext(settings, redis, name=name))
    try:
        with caplog.at_level(logging.ERROR, logger="car_backend.queue.jobqueue"):
            worker.work(burst=True, max_jobs=5)  # burst: returns once both queues are empty
    finally:
        tasks.install(None)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert queue.statuses([new_id, old.id]) == ["finished", "failed"]
    assert Job.fetch(new_id, connection=redis, serializer=queue.batch.serializer).return_value() == {
        "ok": True, "delivered": 0, "seconds": 0.5}
    assert old.id in queue.batch.failed_job_registry.get_job_ids()
    assert redis.llen(queue.batch.intermediate_queue_key) == 0 and queue.batch.count == 0
    assert "older car-backend version" in queue.failure(old.id)  # failed here, not by running it (no retries)
    lines = [r.getMessage() for r in caplog.records if r.name == "car_backend.queue.jobqueue"]
    assert any(old.id in line and "older version" in line for line in lines), lines


def test_pickled_corrections_of_an_older_version_are_dropped_and_not_counted(redis, redis_url, caplog):
    settings, state, _ = _queue(redis, redis_url)
    spec = _spec(settings, state, task_id=31)
    review = ReviewStore(redis)
    project = _project()
    key = ReviewStore.CORRECTIONS.key(project.key)
    for task in (31, 32, 33):  # what the previous version left
        redis.hset(key, str(task), zlib.compress(pickle.dumps(_correction(task, spec))))
    with caplog.at_level(logging.WARNING, logger="car_backend.review.store"):
        assert review.put_correction(project, _correction(34, spec)) == 1
    dropped = [r.getMessage() for r in caplog.records if r.name == "car_backend.review.store"]
    assert len(dropped) == 3 and all(str(project) in m for m in dropped), dropped
    assert sorted(int(t) for t in redis.hkeys(key) if t != b"format") == [34]
    for raw in redis.hvals(key):
        json.loads(raw)  # nothing else is left in the hash
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="car_backend.review.store"):
        assert [c.task for c in review.corrections(project)] == [34]
    assert not [r for r in caplog.records if r.name == "car_backend.review.store"]
