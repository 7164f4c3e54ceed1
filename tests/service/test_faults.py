"""Delivery for real: `car-backend worker` processes, the real Redis, the fake Label Studio in fault modes.

Each fault scenario (car_backend.testing.faults) ends with every task's prediction stored exactly once;
the other tests cover pending failures (a setting, not the image) and forged tasks.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from car_backend.queue.stats import CounterFamily, DeliveryOutcome, Stats
from car_backend.testing.fake_label_studio import image_bytes
from car_backend.testing.faults import SCENARIOS
from tests.support.service import BRUSH, DELIVERY_TIMEOUT_S, ls_tasks, predict

pytestmark = pytest.mark.integration


@pytest.fixture
def image_host():
    """An image server on 127.0.0.2 (another host than Label Studio's): GET /<name> -> a PNG."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = image_bytes(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.2:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_host_not_allowed_is_pending_never_empty_and_allowing_it_predicts(
        service_settings, make_client, spawn_worker, fake_ls, image_host, task_ids):
    ids = task_ids(3)
    tasks = [{"id": t, "data": {"image": f"{image_host}/external-{t}.png"}} for t in ids]
    ls_tasks(fake_ls, 1, tasks)
    refused = service_settings(queue=f"hosts-{ids[0]}", job_retries=0)
    worker = spawn_worker(refused)
    body = predict(make_client(refused), tasks)
    assert all("result" not in e for e in body["results"]), body  # never the permanent `result: []`
    assert all("CAR_ALLOWED_HOSTS" in e["reason"] for e in body["results"]), body
    again = make_client(refused)
    assert again.get("/health").get_json()["pending_failures"]["count"] == 0
    predict(again, tasks)  # answered from the cached pending failures
    pending = again.get("/health").get_json()["pending_failures"]
    assert pending["count"] == 3 and "CAR_ALLOWED_HOSTS" in pending["last_reason"]
    time.sleep(1.0)
    assert all(fake_ls.predictions_for(t) == [] for t in ids)  # nothing written into Label Studio either
    worker.stop()
    # The operator allows the host (and restarts the workers with it): the cached failures no longer count.
    allowed = service_settings(queue=f"hosts-{ids[0]}", job_retries=0, allowed_hosts=(image_host.split("//")[1],))
    spawn_worker(allowed)
    body = predict(make_client(allowed), tasks)
    assert all("result" in e and "error" not in e for e in body["results"]), body  # computed, not failed


def _refused(redis) -> float:
    return Stats(redis).read().get(CounterFamily.DELIVERIES, DeliveryOutcome.REFUSED)


def test_a_forged_predict_writes_nothing_and_the_real_late_task_is_written(
        service_settings, make_client, spawn_worker, fake_ls, redis, task_ids):
    real, forged = task_ids(2)
    # In Label Studio, `forged` holds another image than the one the caller claims it holds.
    ls_tasks(fake_ls, 1, [{"id": real, "data": {"image": f"{fake_ls.url}/img/real-{real}.png"}},
                          {"id": forged, "data": {"image": f"{fake_ls.url}/img/theirs-{forged}.png"}}])
    settings = service_settings(queue=f"forged-{real}", predict_wait=0.0)
    before = _refused(redis)
    predict(make_client(settings), [{"id": real, "data": {"image": f"{fake_ls.url}/img/real-{real}.png"}},
                                    {"id": forged, "data": {"image": f"{fake_ls.url}/img/mine-{forged}.png"}}])
    spawn_worker(settings)
    assert len(fake_ls.wait_for_predictions([real], DELIVERY_TIMEOUT_S)[real]) == 1  # the control
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while _refused(redis) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake_ls.predictions_for(forged) == []
    assert _refused(redis) - before == 1
    metrics = make_client(settings).get("/metrics").get_data(as_text=True)
    assert 'car_api_deliveries_refused' in metrics


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_fault_scenario_loses_and_duplicates_nothing(scenario, redis_url, tmp_path):
    outcome = SCENARIOS[scenario](redis_url, tmp_path, 6)
    assert outcome.faults > 0, outcome  # the fault did happen
    assert (outcome.lost, outcome.duplicated) == (0, 0), outcome


def test_status_reports_a_project_s_tasks(service_settings, make_client, spawn_worker, fake_ls, task_ids):
    ids = task_ids(3)
    project = ids[0]
    tasks = [{"id": t, "data": {"image": f"{fake_ls.url}/img/status-{t}.png"}} for t in ids[:2]]
    tasks.append({"id": ids[2], "data": {"image": f"{fake_ls.url}/bad/status-{ids[2]}.png"}})
    ls_tasks(fake_ls, project, tasks)
    settings = service_settings(queue=f"status-{project}", predict_wait=0.0)
    client = make_client(settings)
    client.post("/predict", json={"tasks": tasks, "label_config": BRUSH, "project": f"{project}.1"})
    queued = client.get(f"/status?project={project}").get_json()
    assert queued["total"] == 3 and queued["queued"] == 3 and queued["delivered"] == 0
    assert queued["fit"] is None  # no mask-head training was ever queued for this project
    spawn_worker(settings)
    fake_ls.wait_for_predictions(ids, DELIVERY_TIMEOUT_S)
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while client.get(f"/status?project={project}").get_json()["delivered"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    done = client.get(f"/status?project={project}").get_json()
    assert done["delivered"] == 3 and done["waiting_to_be_written"] == 0 and done["queued"] == 0
    assert done["empty"] == 1  # the undecodable image: a permanent failure, written as an empty prediction
    one = client.get(f"/status?project={project}&task={ids[2]}").get_json()
    assert one["tasks"][0]["state"] == "delivered" and "decode" in one["tasks"][0]["reason"]
    assert client.get("/status").status_code == 400


def test_embedded_mode_resumes_its_queue_and_late_writes_after_a_restart(service_settings, fake_ls, task_ids,
                                                                          tmp_path):
    from car_backend.pipeline.planning import plan_task
    from car_backend.queue.connection import connect
    from car_backend.queue.jobqueue import JobQueue
    from car_backend.queue.ledger import LateRecord
    from car_backend.queue.state import RedisState
    from car_backend.review.store import ReviewStore
    from car_backend.service.backend import Backend
    from car_backend.service.projects import Projects

    (task_id,) = task_ids(1)
    task = {"id": task_id, "data": {"image": f"{fake_ls.url}/img/resumed-{task_id}.png"}}
    ls_tasks(fake_ls, 5, [task])
    settings = service_settings(redis_url="", data_dir=str(tmp_path / "data"))
    # A server queued the job and registered the late write, then stopped before any worker ran it.
    first = connect(settings)
    state = RedisState.on(first.redis, settings)
    project = Projects(settings, state.projects, ReviewStore(first.redis)).for_predict("5.1", BRUSH)
    plan = plan_task(task, project, settings)
    JobQueue(settings, first.redis, state.locks).submit(plan.specs[0])
    state.ledger.register_late([LateRecord(task_id, plan.specs[0].model_version, tuple(plan.keys), project.project,
                                           (plan.specs[0].image,), config=project.label_hash,
                                           sources=tuple(plan.sources))])
    first.close()
    assert (tmp_path / "data").exists() and any((tmp_path / "data").rglob("*.aof"))
    backend = Backend(settings)  # restarted: same CAR_DATA_DIR, its embedded worker finds the job
    try:
        posted = fake_ls.wait_for_predictions([task_id], DELIVERY_TIMEOUT_S)[task_id]
        assert len(posted) == 1 and posted[0]["model_version"] == plan.specs[0].model_version
    finally:
        backend.close()
