"""Storage mistakes stay pending: Label Studio's 404 for a local file or an upload, a cloud storage's 403
after the presign redirect. A real worker process, the real Redis, the fake Label Studio; fixing the
storage (here: the file appears) makes the next /predict predict the task."""

from __future__ import annotations

import base64
import time

import pytest

from car_backend.pipeline.compute import failure_conditions
from car_backend.pipeline.planning import plan_task
from car_backend.queue.results import ResultCache
from car_backend.service.backend import Backend
from tests.support.fake_label_studio import Reply, image_bytes
from tests.support.service import BRUSH, predict

pytestmark = pytest.mark.integration

PNG = {"Content-Type": "image/png"}


def _presigned(task: int) -> tuple[str, str, str]:
    """(task data reference, Label Studio's presign path, the storage's path it redirects to)."""
    uri = f"s3://bucket/photo-{task}.png"
    return uri, f"/tasks/{task}/presign/?fileuri={base64.urlsafe_b64encode(uri.encode()).decode()}", \
        f"/bucket/photo-{task}.png?X-Amz-Signature=s"


def test_storage_refusals_are_pending_never_cached_as_failed_and_recover(
        service_settings, make_client, spawn_worker, fake_ls, redis, task_ids):
    local, upload, cloud = task_ids(3)
    local_path = f"/data/local-files/?d=photos/{local}.png"
    upload_path = f"/data/upload/1/{upload}.png"
    uri, presign, signed = _presigned(cloud)
    tasks = [{"id": local, "data": {"image": local_path}}, {"id": upload, "data": {"image": upload_path}},
             {"id": cloud, "data": {"image": uri}}]
    fake_ls.add_tasks(1, tasks)
    fake_ls.routes[local_path] = Reply(404, b"not found")  # LOCAL_FILES_DOCUMENT_ROOT is wrong
    fake_ls.routes[upload_path] = Reply(404, b"not found")
    fake_ls.routes[presign] = Reply(302, headers={"Location": f"http://localhost:{fake_ls.port}{signed}"})
    fake_ls.routes[signed] = Reply(403, b"<Error>AccessDenied</Error>")  # the bucket refuses the signature
    settings = service_settings(queue=f"storage-{local}", job_retries=0, pending_ttl=1,
                                allowed_hosts=("localhost",))
    spawn_worker(settings)
    client = make_client(settings)
    body = predict(client, tasks)
    for entry in body["results"]:
        assert "result" not in entry and entry.get("status") == "pending", body  # never the permanent `result: []`
    reasons = [e["reason"] for e in body["results"]]
    # Label Studio's own answers are not told to the caller (which of its objects exist); the storage's are
    assert all("not given by Label Studio" in r for r in reasons[:2]) and "HTTP 403" in reasons[2], reasons
    # Nothing is kept as a failure: each job's result is a pending failure, gone after CAR_PENDING_TTL.
    backend = Backend(settings)
    try:
        project = backend.projects.for_predict("1.1", BRUSH)
        keys = [k for task in tasks for k in plan_task(task, project, settings).keys]
    finally:
        backend.close()
    for key, found in zip(keys, ResultCache(redis, settings.result_ttl, conditions=failure_conditions(settings)).get_many(keys), strict=True):
        assert found is not None and found.pending and not found.ok, found
        assert 0 < redis.ttl(ResultCache.RESULT.key(key)) <= settings.pending_ttl
    time.sleep(1.0)
    assert all(fake_ls.predictions_for(t["id"]) == [] for t in tasks)  # nothing written into Label Studio either
    # The operator fixes the storage: the files are there now.
    fake_ls.routes[local_path] = Reply(body=image_bytes("local"), headers=PNG)
    fake_ls.routes[upload_path] = Reply(body=image_bytes("upload"), headers=PNG)
    fake_ls.routes[signed] = Reply(body=image_bytes("cloud"), headers=PNG)
    time.sleep(settings.pending_ttl + 0.5)
    body = predict(client, tasks)
    assert all("result" in e and "error" not in e for e in body["results"]), body  # predicted (the tiny model
    # may find nothing in two flat colours), not failed
