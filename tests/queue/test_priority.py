"""Interactive before batch, for real: the real Redis, a real `car-backend worker`, a backlog of slow batch jobs.

A worker serves `<queue>-interactive` first, so a job a person waits for (single-task /predict, or one with
an interactive `context`) starts as soon as the worker finishes its current job, ahead of every batch job
(multi-task /predict, prelabel) still waiting. One worker makes the order of start times the order of
dequeues. Slow jobs are slow by their image, which the fake Label Studio serves late.
"""

from __future__ import annotations

import time
import uuid

import pytest
from rq import Queue
from rq.job import Job

from car_backend.pipeline.planning import plan_task
from car_backend.queue.jobqueue import SERIALIZER
from car_backend.service.backend import Backend
from tests.support.label_configs import label_config
from tests.support.service import DELIVERY_TIMEOUT_S, predict

pytestmark = pytest.mark.integration

INTERACTIVE = label_config("interactive")
BATCH_JOBS = 6
BACKLOG = 12  # the HTTP test's batch tasks: not drained, so a long backlog costs nothing
SLOW_S = 1.0  # each batch job's image answers this late


def wait_until_fetched(fake_ls, path: str, worker) -> None:
    """Until the worker is fetching `path` (mid-job, with its models loaded)."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while fake_ls.hits[path] == 0:
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.02)


def test_an_interactive_job_starts_before_the_waiting_batch_jobs(service_settings, spawn_worker, fake_ls, task_ids):
    settings = service_settings(queue=f"prio-{uuid.uuid4().hex[:8]}")
    worker = spawn_worker(settings)
    backend = Backend(settings)
    try:
        project = backend.projects.for_predict(None, INTERACTIVE)

        def submit(task_id: int, image: str, interactive: bool = False) -> str:
            (spec,) = plan_task({"id": task_id, "data": {"image": f"{fake_ls.url}/{image}"}}, project, settings).specs
            job_id, created = backend.queue.submit(spec, interactive=interactive)
            assert created
            return job_id

        ids = task_ids(BATCH_JOBS + 1)
        batch = [submit(t, f"slow/{SLOW_S}/prio-batch-{t}.png") for t in ids[:BATCH_JOBS]]
        wait_until_fetched(fake_ls, f"slow/prio-batch-{ids[0]}.png", worker)  # the first batch job is running
        interactive = submit(ids[-1], f"img/prio-interactive-{ids[-1]}.png", interactive=True)

        everything = [*batch, interactive]
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S + BATCH_JOBS * SLOW_S
        while any(status != "finished" for status in backend.queue.statuses(everything)):
            assert time.monotonic() < deadline, (backend.queue.statuses(everything), worker.output())
            time.sleep(0.1)
        jobs = {job.id: job for job in Job.fetch_many(everything, connection=backend.redis, serializer=SERIALIZER)}
    finally:
        backend.close()
    order = sorted(everything, key=lambda job_id: jobs[job_id].started_at)
    # Next after the batch job that was running when it came, ahead of the five that were waiting.
    assert order == [batch[0], interactive, *batch[1:]], [
        (job_id == interactive, jobs[job_id].origin, jobs[job_id].started_at.isoformat()) for job_id in order]
    assert jobs[interactive].origin == f"{settings.queue}-interactive"


def test_an_interactive_predict_is_answered_ahead_of_a_batch_backlog(service_settings, spawn_worker, make_client,
                                                                     fake_ls, task_ids, redis):
    """/predict with a typed prompt while a multi-task /predict's jobs wait: answered after the current job."""
    queue = f"prio-http-{uuid.uuid4().hex[:8]}"
    worker = spawn_worker(service_settings(queue=queue))
    ids = task_ids(BACKLOG + 1)
    backlog = [{"id": t, "data": {"image": f"{fake_ls.url}/slow/{SLOW_S}/prio-backlog-{t}.png"}}
               for t in ids[:BACKLOG]]
    pending = predict(make_client(service_settings(queue=queue, predict_wait=0.0)), backlog, xml=INTERACTIVE)
    assert all("result" not in e for e in pending["results"])  # left to the workers: a batch backlog
    wait_until_fetched(fake_ls, f"slow/prio-backlog-{ids[0]}.png", worker)

    client = make_client(service_settings(queue=queue, predict_wait=DELIVERY_TIMEOUT_S))
    task = {"id": ids[-1], "data": {"image": f"{fake_ls.url}/img/prio-typed-{ids[-1]}.png"}}
    context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                           "value": {"text": ["the red car"]}}]}
    started = time.monotonic()
    resp = client.post("/predict", json={"tasks": [task], "label_config": INTERACTIVE, "params": {"context": context}})
    elapsed = time.monotonic() - started
    waiting = redis.llen(Queue(queue, connection=redis).key)  # batch jobs not yet started when the answer came
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert "result" in resp.get_json()["results"][0], resp.get_json()
    # Behind the backlog it would have waited for all of it ((BACKLOG - 1) * SLOW_S at least) and found the batch
    # queue empty. Ahead of it: the current job, and maybe the next one's start while /predict polled.
    assert waiting >= BACKLOG - 3, (waiting, elapsed)
    assert elapsed < BACKLOG * SLOW_S / 2, (waiting, elapsed)


def test_an_interactive_call_for_a_queued_batch_image_starts_before_the_batch(service_settings, spawn_worker,
                                                                              make_client, fake_ls, task_ids):
    """A task's batch job still waits in the batch queue when an annotator opens it: the single-task /predict
    moves that job to the interactive queue, so it runs next, ahead of the batch jobs queued before it."""
    settings = service_settings(queue=f"promote-{uuid.uuid4().hex[:8]}")
    worker = spawn_worker(settings)
    backend = Backend(settings)
    try:
        project = backend.projects.for_predict(None, INTERACTIVE)

        def task(task_id: int, image: str) -> dict:
            return {"id": task_id, "data": {"image": f"{fake_ls.url}/{image}"}}

        ids = task_ids(BATCH_JOBS + 1)
        opened = task(ids[-1], f"img/promote-opened-{ids[-1]}.png")
        batch_tasks = [task(t, f"slow/{SLOW_S}/promote-batch-{t}.png") for t in ids[:BATCH_JOBS]] + [opened]
        specs = [plan_task(t, project, settings).specs[0] for t in batch_tasks]
        batch = [job_id for job_id, created in backend.queue.submit_many(specs)]
        wait_until_fetched(fake_ls, f"slow/promote-batch-{ids[0]}.png", worker)  # the first batch job runs

        client = make_client(service_settings(queue=settings.queue, predict_wait=DELIVERY_TIMEOUT_S))
        body = predict(client, [opened], xml=INTERACTIVE)
        assert "result" in body["results"][0], body
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S + BATCH_JOBS * SLOW_S
        while any(status != "finished" for status in backend.queue.statuses(batch)):
            assert time.monotonic() < deadline, (backend.queue.statuses(batch), worker.output())
            time.sleep(0.1)
        jobs = {job.id: job for job in Job.fetch_many(batch, connection=backend.redis, serializer=SERIALIZER)}
    finally:
        backend.close()
    order = sorted(batch, key=lambda job_id: jobs[job_id].started_at)
    # The opened task's job (queued last) ran right after the one running, ahead of the five queued before it.
    assert order == [batch[0], batch[-1], *batch[1:-1]], [(jobs[j].origin, jobs[j].started_at) for j in order]
    assert jobs[batch[-1]].origin == f"{settings.queue}-interactive"
