"""The interactive lane, for real: a `car-backend worker` with CAR_INTERACTIVE_LANE=on runs a second process
that serves the interactive queue only, so an annotator's /predict never waits for the batch job running.

Slow batch jobs are slow by their image, which the fake Label Studio serves late (the worker is busy all the
while); `benchmarks/interactive.py` measures the same with jobs slow by their computation.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from redis import Redis

from car_backend.pipeline.planning import plan_task
from car_backend.queue import rqcompat
from car_backend.service.backend import Backend
from car_backend.settings import Settings
from car_backend.worker.health import check
from car_backend.worker.lanes import LANE_SUFFIX, is_lane
from car_backend.worker.process import BATCH_NICE, LANE_MIN_MEMORY, lane_wanted
from tests.support.label_configs import label_config
from tests.support.settings import tiny_settings

INTERACTIVE = label_config("interactive")
SLOW_S = 10.0  # the batch job's image answers this late
LANE_START_S = 60.0


def lane_pids(redis: Redis, name: str) -> list[int]:
    """The process ids of the lanes named `name` or `name-<n>` that registered with RQ and are running."""
    pids = []
    for key in redis.smembers(rqcompat.WORKERS_KEY):
        key = rqcompat.as_text(key)
        worker = key[len(rqcompat.WORKER_KEY_PREFIX):]
        if worker.startswith(name) and is_lane(worker):
            pid = redis.hget(key, "pid")
            if pid is not None and running(int(pid)):
                pids.append(int(pid))
    return pids


def wait_for_lane(redis: Redis, name: str, worker, other_than: int | None = None) -> int:
    deadline = time.monotonic() + LANE_START_S
    while True:
        pids = [pid for pid in lane_pids(redis, name) if pid != other_than]
        if pids:
            return pids[0]
        assert time.monotonic() < deadline, worker.output()[-3000:]
        time.sleep(0.1)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])  # field 19 of proc(5)


def test_when_a_worker_runs_a_lane():
    on, off, auto = (tiny_settings(interactive_lane=mode) for mode in ("on", "off", "auto"))
    assert lane_wanted(on, burst=False, memory=2**30)[0]
    assert not lane_wanted(off, burst=False, memory=64 * 2**30)[0]
    assert lane_wanted(auto, burst=False, memory=LANE_MIN_MEMORY)[0]
    small = lane_wanted(auto, burst=False, memory=LANE_MIN_MEMORY - 1)
    assert not small[0] and "CAR_INTERACTIVE_LANE=on" in small[1]
    assert not lane_wanted(on, burst=True, memory=64 * 2**30)[0]  # a burst worker drains and exits
    assert Settings().interactive_lane == "auto"
    assert is_lane("host-12" + LANE_SUFFIX) and is_lane(f"w{LANE_SUFFIX}-2-1") and not is_lane("host-12-3")


@pytest.mark.integration
def test_an_interactive_predict_does_not_wait_for_the_running_batch_job(service_settings, spawn_worker, make_client,
                                                                       fake_ls, task_ids, redis):
    settings = service_settings(queue=f"lane-{uuid.uuid4().hex[:8]}", interactive_lane="on")
    worker = spawn_worker(settings)
    lane = wait_for_lane(redis, worker.name + LANE_SUFFIX, worker)
    assert nice(worker.proc.pid) - nice(lane) == BATCH_NICE  # the batch worker yields the CPU to its lane
    backend = Backend(settings)
    try:
        project = backend.projects.for_predict(None, INTERACTIVE)
        batch_id, interactive_id = task_ids(2)
        batch_task = {"id": batch_id, "data": {"image": f"{fake_ls.url}/slow/{SLOW_S}/lane-batch-{batch_id}.png"}}
        (spec,) = plan_task(batch_task, project, settings).specs
        batch_job, created = backend.queue.submit(spec)
        assert created
        deadline = time.monotonic() + LANE_START_S
        while fake_ls.hits[f"slow/lane-batch-{batch_id}.png"] == 0:  # the worker runs the batch job
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.02)
        busy_since = time.monotonic()

        client = make_client(service_settings(queue=settings.queue, predict_wait=SLOW_S * 3))
        task = {"id": interactive_id, "data": {"image": f"{fake_ls.url}/img/lane-typed-{interactive_id}.png"}}
        context = {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                               "value": {"text": ["the red car"]}}]}
        started = time.monotonic()
        resp = client.post("/predict", json={"tasks": [task], "label_config": INTERACTIVE,
                                             "params": {"context": context}})
        answered = time.monotonic()
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert "result" in resp.get_json()["results"][0], resp.get_json()
        (batch_status,) = backend.queue.statuses([batch_job])
        health = client.get("/health").get_json()
    finally:
        backend.close()
    # Well before the batch job (SLOW_S of image download alone) ends, which it had not when the answer came.
    assert answered - started < SLOW_S / 2, (answered - started, worker.output()[-3000:])
    assert answered - busy_since < SLOW_S and batch_status.value == "started", batch_status
    assert (health["workers"], health["lanes"]) == (1, 1), health


@pytest.mark.integration
def test_a_lane_is_started_again_when_it_dies_and_stops_with_its_worker(service_settings, spawn_worker, redis):
    settings = service_settings(queue=f"lane-life-{uuid.uuid4().hex[:8]}", interactive_lane="on")
    worker = spawn_worker(settings)
    first = wait_for_lane(redis, worker.name + LANE_SUFFIX, worker)
    os.kill(first, signal.SIGKILL)
    second = wait_for_lane(redis, worker.name + LANE_SUFFIX, worker, other_than=first)
    assert running(worker.proc.pid)
    # The container health check looks at the worker, never at its lane.
    alive, message = check(settings, worker.name)
    assert alive and LANE_SUFFIX not in message, message

    assert worker.stop(timeout=45) == 0, worker.output()[-4000:]  # a warm stop, its lane's included
    deadline = time.monotonic() + 20
    while running(second):
        assert time.monotonic() < deadline, "the lane outlived its worker"
        time.sleep(0.1)


@pytest.mark.integration
def test_a_lane_leaves_when_its_worker_is_killed(service_settings, spawn_worker, redis):
    settings = service_settings(queue=f"lane-kill-{uuid.uuid4().hex[:8]}", interactive_lane="on")
    worker = spawn_worker(settings)
    lane = wait_for_lane(redis, worker.name + LANE_SUFFIX, worker)
    worker.signal(signal.SIGKILL)
    worker.proc.wait(10)
    deadline = time.monotonic() + 30
    while running(lane):
        assert time.monotonic() < deadline, "the lane outlived its killed worker"
        time.sleep(0.1)

