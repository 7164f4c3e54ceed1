"""A retrieve on a whole project: Label Studio sends every selected task in one /predict. 10,000 tasks x 20
labels at the default limits are accepted and answered in time: the finished tasks with their regions, the
rest pending and queued."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from rq import Queue

from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobResult
from car_backend.queue.jobqueue import SERIALIZER
from car_backend.service.app import create_app
from car_backend.service.backend import Backend
from car_backend.settings import LS_TASK_MIN_BYTES, Settings

pytestmark = pytest.mark.integration

TASKS, LABELS, CACHED = 10_000, 20, 100
XML = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
       + "".join(f'<Label value="label{i}"/>' for i in range(LABELS)) + "</BrushLabels></View>")
REGION = {"id": "r", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 96,
          "original_height": 64, "image_rotation": 0, "value": {"format": "rle", "rle": [1], "brushlabels": ["label0"]}}


def label_studio_task(task_id: int, image: str) -> dict:
    """A task as Label Studio's TaskSimpleSerializer sends it to /predict."""
    stamp = "2026-01-01T00:00:00.000000Z"
    return {"id": task_id, "data": {"image": image}, "meta": {}, "project": 1, "created_at": stamp,
            "updated_at": stamp, "updated_by": None, "is_labeled": False, "overlap": 1, "file_upload": None,
            "inner_id": task_id, "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 0,
            "comment_count": 0, "unresolved_comment_count": 0, "comment_authors": [],
            "last_comment_updated_at": None, "annotations": [], "predictions": []}


def test_the_default_task_limit_admits_what_the_default_body_limit_carries():
    smallest = label_studio_task(1, "")
    smallest["data"] = {}
    assert len(json.dumps(smallest, separators=(",", ":"))) > LS_TASK_MIN_BYTES
    defaults = Settings()
    assert defaults.max_tasks == 0 and defaults.task_limit == defaults.max_request_bytes // LS_TASK_MIN_BYTES
    assert defaults.task_limit >= 80_000
    assert Settings(max_tasks=7).task_limit == 7


def test_ten_thousand_tasks_at_the_default_limits_answer_in_time(service_settings, fake_ls, redis, task_ids):
    defaults = Settings()
    ids = task_ids(TASKS)
    tasks = [label_studio_task(t, f"/data/upload/1/big-{t}.png") for t in ids]
    body = json.dumps({"tasks": tasks, "label_config": XML, "project": "1.1"})
    assert len(body) < defaults.max_request_bytes
    settings = service_settings(queue=f"big-{ids[0]}", predict_wait=defaults.predict_wait,
                                max_tasks=defaults.max_tasks, max_request_bytes=defaults.max_request_bytes)
    backend = Backend(settings)
    try:
        project = backend.projects.for_predict("1.1", XML)
        for task in tasks[:CACHED]:  # finished before the retrieve (an earlier request, a worker)
            backend.state.results.put(plan_task(task, project, settings).specs[0].key,
                                      JobResult(ok=True, regions=[REGION], score=0.5))
        client = create_app(settings, backend).test_client()
        # No worker is alive: the call queues every job and answers without waiting for them.
        started = time.monotonic()
        resp = client.post("/predict", data=body, content_type="application/json")
        answered = time.monotonic() - started
        assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
        entries = resp.get_json()["results"]
        assert len(entries) == TASKS
        assert all(e["result"] == [REGION] for e in entries[:CACHED])
        assert all("result" not in e and e["status"] == "pending" for e in entries[CACHED:])
        assert backend.queue.depth().batch == TASKS - CACHED  # queued, one job per task
        # Queueing 10,000 jobs is no bottleneck: far inside the wait, on two shared cores.
        assert answered < min(30.0, settings.predict_wait + 5.0), answered
        # A worker assumed busy: the call waits, and still answers by CAR_PREDICT_WAIT + 5 s.
        short = dataclasses.replace(settings, predict_wait=8.0)
        backend.workers_available = lambda: True
        waiting = create_app(short, backend).test_client()
        started = time.monotonic()
        resp = waiting.post("/predict", data=body, content_type="application/json")
        answered = time.monotonic() - started
        assert resp.status_code == 200 and len(resp.get_json()["results"]) == TASKS
        assert answered < short.predict_wait + 5.0, answered
    finally:
        for name in (settings.queue, f"{settings.queue}-interactive"):
            Queue(name, connection=redis, serializer=SERIALIZER).empty()
        backend.close()
