"""Every RQ job car-backend queues is named by one stable import path (`queue.jobqueue.JobName`), each of them
resolves, and a job an older version queued under another name is refused, not run."""

from __future__ import annotations

import ast
import logging
import signal
import uuid
from pathlib import Path

import pytest
from rq.job import Job, JobStatus
from rq.utils import import_attribute

from car_backend.pipeline.identity import ProjectId
from car_backend.queue.jobqueue import SERIALIZER, JobName, JobQueue
from car_backend.queue.state import RedisState
from car_backend.review.webhook import AnnotationEvent, WebhookOutcome
from car_backend.worker import tasks
from car_backend.worker.context import WorkerContext
from car_backend.worker.process import CarWorker, make_worker
from tests.support.settings import tiny_settings

PACKAGE = Path(__file__).resolve().parents[1] / "car_backend"
# What the previous version queued: none of these paths exists any more.
OLD_NAMES = ("car_backend.queue.jobs.run_job", "car_backend.review.jobs.review_annotation",
             "car_backend.review.jobs.calibrate_project", "car_backend.review.fit.fit_project")


@pytest.mark.parametrize("name", list(JobName))
def test_every_job_name_resolves_to_a_worker_entry_point(name):
    function = import_attribute(name.value)
    assert callable(function)
    assert function.__module__ == tasks.__name__ and f"{function.__module__}.{function.__name__}" == name.value


def _queued_functions(path: Path) -> list[str]:
    """The first argument of every enqueue/enqueue_call/submit_call call in a module, as source text."""
    tree = ast.parse(path.read_text())
    return [f"{path.name}:{ast.unparse(node.args[0])}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("enqueue", "enqueue_call", "submit_call") and node.args]


def test_the_product_queues_only_job_names():
    found = [hit for path in PACKAGE.rglob("*.py") if "testing" not in path.parts
             for hit in _queued_functions(path)]
    assert found  # the scan sees the queueing calls
    allowed = {"JobName.SEGMENT.value", "name.value", *(f"JobName.{n.name}" for n in JobName)}
    assert [hit for hit in found if hit.split(":", 1)[1] not in allowed] == []


def test_a_job_an_older_version_queued_is_failed_and_the_worker_goes_on(redis, redis_url, caplog):
    settings = tiny_settings(redis_url=redis_url, queue=f"jobs-{uuid.uuid4().hex[:8]}")
    state = RedisState.on(redis, settings)
    queue = JobQueue(settings, redis, state.locks)
    old_jobs = [queue.batch.enqueue_call(name, args=("12",), failure_ttl=600) for name in OLD_NAMES]
    event = AnnotationEvent(ProjectId("local", 7, None), 7, 70, "0" * 64, ())
    new_id = queue.submit_call(JobName.REVIEW, (event.to_dict(),), description="review 7")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tasks.install(WorkerContext(settings, redis, name="jobs-test"))
    worker = make_worker(CarWorker, settings, redis, f"jobs-{uuid.uuid4().hex[:8]}")
    try:
        with caplog.at_level(logging.ERROR, logger="car_backend.queue.jobqueue"):
            worker.work(burst=True, max_jobs=10)
    finally:
        tasks.install(None)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    old_ids = [job.id for job in old_jobs]
    assert queue.statuses([new_id, *old_ids]) == [JobStatus.FINISHED] + [JobStatus.FAILED] * len(OLD_NAMES)
    # The review ran (no Label Studio settings: ignored as unreadable), the old job did not.
    done = Job.fetch(new_id, connection=redis, serializer=SERIALIZER).return_value()
    assert done["ignored"] == WebhookOutcome.UNREADABLE.value and done["task"] == 7
    for old_id in old_ids:  # failed at once, not by running them (the training one still exists in review.fit)
        assert "older car-backend version" in queue.failure(old_id)
        assert old_id in queue.batch.failed_job_registry.get_job_ids()
        assert any(old_id in r.getMessage() for r in caplog.records if r.name == "car_backend.queue.jobqueue")
    assert queue.batch.count == 0 and redis.llen(queue.batch.intermediate_queue_key) == 0


def test_a_raw_rq_job_naming_any_other_function_is_failed_by_a_worker_process_not_run(redis, redis_url, tmp_path,
                                                                                        spawn_worker):
    """Black box: whoever can write to Redis queues `os.system` with plain RQ; a real `car-backend worker
    --burst` fails it with a log line and never runs it."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    settings = tiny_settings(redis_url=redis_url, queue=f"raw-{uuid.uuid4().hex[:8]}")
    proof = tmp_path / "ran"
    queue = JobQueue(settings, redis, RedisState.on(redis, settings).locks)
    raw = Queue(queue.batch.name, connection=redis, serializer=JSONSerializer)
    job = raw.enqueue_call("os.system", args=(f"touch {proof}",), failure_ttl=600)
    worker = spawn_worker(settings, burst=True, wait=False)
    assert worker.proc.wait(120) == 0, worker.output()
    assert not proof.exists()
    assert queue.statuses([job.id]) == [JobStatus.FAILED]
    assert job.id in queue.batch.failed_job_registry.get_job_ids()
    assert job.id in worker.output() and "os.system" in worker.output()
