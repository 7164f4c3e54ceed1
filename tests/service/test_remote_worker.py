"""A remote worker without Label Studio settings: it says so (log, `worker --check`, the server's /health),
computes, stages the late predictions and leaves their writing to a worker that has the settings. Real
worker processes, the real Redis, the fake Label Studio."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.queue.ledger import DeliveryLedger
from car_backend.service import backend as backend_module
from car_backend.testing.settings import settings_env
from car_backend.worker.context import NO_WRITES
from tests.support.service import DELIVERY_TIMEOUT_S, ls_tasks, predict

pytestmark = pytest.mark.integration


def test_a_worker_without_label_studio_settings_stages_and_another_writes(
        service_settings, make_client, spawn_worker, fake_ls, redis, task_ids, monkeypatch):
    ids = task_ids(3)
    tasks = [{"id": t, "data": {"image": f"{fake_ls.url}/img/remote-{t}.png"}} for t in ids]
    ls_tasks(fake_ls, ids[0], tasks)  # a project of its own: its outbox holds only this test's tasks
    project = ProjectId(instance_of(fake_ls.url), ids[0], 1)
    queue = f"remote-{ids[0]}"
    server = service_settings(queue=queue, predict_wait=0.0)
    # The README's first remote-worker command, before LABEL_STUDIO_URL and the key were added to it: the
    # images are reachable (their host is allowed), Label Studio's API is not.
    bare = service_settings(queue=queue, label_studio_url="", label_studio_api_key="",
                            allowed_hosts=(f"127.0.0.1:{fake_ls.port}",))
    lone = spawn_worker(bare)
    body = predict(make_client(server), tasks, project=f"{ids[0]}.1")
    assert all("result" not in e for e in body["results"]), body  # pending: to be written late
    ledger = DeliveryLedger(redis)
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while {r.task for r in ledger.outbox(project, 10)} != set(ids):  # computed and staged by the lone worker
        assert time.monotonic() < deadline, lone.output()
        time.sleep(0.2)
    assert ledger.overdue(time.time()) >= 1
    time.sleep(1.0)
    assert all(fake_ls.predictions_for(t) == [] for t in ids)  # it cannot write them, and drops none
    assert NO_WRITES in lone.output()
    check = subprocess.run([sys.executable, "-m", "car_backend.cli", "worker", "--check", "--name", lone.name],
                           env=settings_env(bare), capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and NO_WRITES in check.stdout, check.stdout + check.stderr
    monkeypatch.setattr(backend_module, "OVERDUE_S", 0.0)  # as if a minute had passed
    health = make_client(server).get("/health").get_json()
    assert health["overdue_outboxes"] >= 1
    assert any("LABEL_STUDIO_API_KEY" in w for w in health["warnings"]), health
    # A worker with the settings comes (or the lone one is restarted with them): every prediction is written.
    spawn_worker(server)
    written = fake_ls.wait_for_predictions(ids, timeout=DELIVERY_TIMEOUT_S)
    assert all(len(written[t]) == 1 for t in ids), written
    assert {p["model_version"] for t in ids for p in written[t]} == {body["model_version"]}
