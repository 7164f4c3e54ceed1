"""A delivery's read-back never makes the only worker wait on its own /predict.

Label Studio's GET /api/tasks/<id>/ calls the ML backend's /predict for a task without any prediction and waits
for the answer. A late delivery reads its tasks back before writing them; read that way, the /predict it
triggers queues a job for the very worker doing the read-back (after the project's settings changed, that job is new), which
waits CAR_PREDICT_WAIT for nothing. Here the fake Label Studio does what Label Studio does (its task GET calls
the real app, served over HTTP, when `backend_url` is set), and one real worker process delivers.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest
import requests
from werkzeug.serving import make_server

from car_backend.service.app import create_app
from car_backend.service.backend import Backend
from car_backend.testing.fake_label_studio import FakeLabelStudio
from tests.support.label_configs import label_config
from tests.support.service import predict
from tests.support.settings import tiny_settings

pytestmark = pytest.mark.integration

BRUSH = label_config("brush")
PREDICT_WAIT_S = 20.0  # how long a /predict triggered by a read-back would wait on the busy worker
PROMPT_S = 12.0  # the deliveries must all be written well before one such wait ends
TASKS = 3


@pytest.fixture
def served():
    """served(settings) -> the app's base URL, served over HTTP by werkzeug in a thread (Label Studio calls it)."""
    running = []

    def serve(settings) -> str:
        backend = Backend(settings)
        server = make_server("127.0.0.1", 0, create_app(settings, backend), threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        running.append((server, thread, backend))
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server, thread, backend in running:
        server.shutdown()
        thread.join(10)
        backend.close()


def test_a_late_delivery_with_one_worker_is_written_promptly_and_asks_for_no_prediction(
        redis_url, spawn_worker, served, make_client, task_ids):
    with FakeLabelStudio() as ls:
        settings = tiny_settings(redis_url=redis_url, label_studio_url=ls.url, label_studio_api_key=ls.api_key,
                                 queue=f"readback-{uuid.uuid4().hex[:8]}", predict_wait=PREDICT_WAIT_S)
        ls.backend_url = served(settings)  # what Label Studio's task GET calls
        ids = task_ids(TASKS)
        project = 7000 + ids[0] % 1000
        tasks = [{"id": t, "data": {"image": f"{ls.url}/img/readback-{t}.png"}} for t in ids]
        ls.add_project(project, BRUSH, tasks, created=1700000000)
        worker = spawn_worker(settings)

        # A retrieve with no time to wait: every task is late, written by the worker when its job ends.
        retrieve = make_client(dataclasses.replace(settings, predict_wait=0.0))
        body = predict(retrieve, tasks, project=f"{project}.1700000000")
        assert all("result" not in entry for entry in body["results"]), body
        started = time.monotonic()
        # The project's settings change (Label Studio's next /setup sends other extra_params): a /predict now
        # needs jobs of a new version, which would queue behind the worker doing the read-back. (A change of
        # the label config itself would refuse these writes: they were planned with the old one.)
        setup = requests.post(f"{ls.backend_url}/setup", json={"project": f"{project}.1700000000", "schema": BRUSH,
                                                             "extra_params": {"preset": "voc"}}, timeout=10)
        assert setup.status_code == 200 and setup.json()["model_version"] != body["model_version"], setup.text

        found = ls.wait_for_predictions(ids, timeout=PROMPT_S)
        elapsed = time.monotonic() - started
        assert all(found.values()), (elapsed, found, worker.output()[-3000:])
        assert elapsed < PROMPT_S
        assert not ls.backend_predicts, ls.backend_predicts  # the read-back triggered no /predict
        reads = [s.path for s in ls.seen_paths("/api/tasks")]
        assert reads and all(p.startswith("/api/tasks/?") for p in reads), reads
