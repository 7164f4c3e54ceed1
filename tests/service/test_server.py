"""The HTTP app through Flask's test client, with the real Redis and no worker: what answers without inference."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest

from car_backend.pipeline.planning import plan_task
from car_backend.pipeline.spec import JobResult, JobSpec
from car_backend.service.backend import Backend
from tests.support.label_configs import label_config
from tests.support.redis import free_port, start_redis_server

BRUSH = label_config("brush")


def _region(name: str) -> dict:
    return {"id": name, "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 4,
            "original_height": 4, "image_rotation": 0, "value": {"format": "rle", "rle": [1], "brushlabels": [name]},
            "score": 0.5}


def _cache(settings, task: dict, regions: list[dict], xml: str = BRUSH) -> JobSpec:
    """Put a finished result for `task` into the result cache, as a worker would."""
    backend = Backend(settings)
    try:
        project = backend.projects.setup(None, xml, None)
        spec = plan_task(task, project, settings).specs[0]
        backend.state.results.put(spec.key, JobResult(ok=True, regions=regions, score=0.7))
        return spec
    finally:
        backend.close()


def test_health_answers_fast_with_queue_figures(service_settings, make_client):
    client = make_client(service_settings())
    started = time.monotonic()
    resp = client.get("/health")
    body = resp.get_json()
    assert time.monotonic() - started < 0.5
    # No worker serves this Redis: still 200 (Label Studio keeps the backend connected), with the warning.
    assert resp.status_code == 200
    assert body["status"] == "DEGRADED" and body["redis"] == "ok" and body["mode"] == "redis"
    assert body["workers"] == 0 and any("no live worker" in w for w in body["warnings"])
    assert body["model_version"].startswith("car-0.1.0-coco-")
    assert set(body["queue"]) >= {"interactive", "batch", "started", "failed"}
    assert client.get("/").get_json()["model_version"] == body["model_version"]


def test_setup_returns_version_and_predictable_controls(service_settings, make_client):
    client = make_client(service_settings())
    boxed = BRUSH.replace("</View>", '<RectangleLabels name="box" toName="image"><Label value="a"/></RectangleLabels>'
                                      "</View>")
    xml = boxed.replace("</View>", '<KeyPointLabels name="kp" toName="image"><Label value="a"/></KeyPointLabels>'
                                   "</View>")
    resp = client.post("/setup", json={"project": "3.1700000000", "schema": xml, "hostname": "x",
                                       "access_token": "legacy", "extra_params": None})
    assert resp.status_code == 200
    body = resp.get_json()
    # a project's version covers its label config: the box is a target, the skipped keypoints are not output;
    # /versions names the settings' own version, which no project has
    def version(schema: str) -> str:
        return client.post("/setup", json={"project": "3.1700000000", "schema": schema}).get_json()["model_version"]

    assert body["model_version"] == version(boxed) != version(BRUSH)
    assert body["model_version"] != client.get("/versions").get_json()["versions"][0]
    assert body["targets"] == [{"from_name": "tag", "to_name": "image", "image": "image", "type": "brushlabels",
                                "labels": ["person", "car", "dog", "cat", "tree"], "dynamic_labels": None,
                                "referring": None, "preset": "coco"},
                               {"from_name": "box", "to_name": "image", "image": "image", "type": "rectanglelabels",
                                "labels": ["a"], "dynamic_labels": None, "referring": None, "preset": "coco"}]
    assert len(body["skipped"]) == 1 and body["skipped"][0].startswith("kp:")


def test_setup_extra_params_change_the_version_and_predict_agrees(service_settings, make_client, task_ids):
    client = make_client(service_settings(predict_wait=0.0))
    plain = client.post("/setup", json={"project": "4.1", "schema": BRUSH}).get_json()["model_version"]
    # Label Studio sends extra_params as a JSON string or an object; both work.
    as_text = client.post("/setup", json={"project": "5.1", "schema": BRUSH,
                                          "extra_params": '{"preset": "voc"}'}).get_json()["model_version"]
    as_dict = client.post("/setup", json={"project": "5.1", "schema": BRUSH,
                                          "extra_params": {"preset": "voc"}}).get_json()["model_version"]
    assert as_text == as_dict != plain and "-voc-" in as_text
    # /predict carries no extra_params: the project's /setup ones are used, so the versions agree.
    tasks = [{"id": t, "data": {"image": f"{t}.png"}} for t in task_ids(2)]
    predicted = client.post("/predict", json={"tasks": tasks, "project": "5.1", "label_config": BRUSH}).get_json()
    assert predicted["model_version"] == as_text
    assert [e["model_version"] for e in predicted["results"]] == [as_text, as_text]


@pytest.mark.parametrize("xml, fragment", [
    ("<View><Image name='i' value='$image'/></View>", "nothing to predict"),
    ("<View><Image name='i' value='$image'/><Choices name='c' toName='i' perRegion='true'><Choice value='a'/>"
     "</Choices></View>", "nothing to predict"),
    ("<View><Image", "label config: "),
])
def test_setup_rejects_configs_it_cannot_use(service_settings, make_client, xml, fragment):
    resp = make_client(service_settings()).post("/setup", json={"project": "1.1", "schema": xml})
    assert resp.status_code == 400
    assert fragment in resp.get_json()["error"]


def test_health_and_setup_never_load_models(service_settings, redis_url):
    """Checked in a clean process where loading any CLIP raises: both routes still answer."""
    code = f"""
import car_backend.engine.models as models
def refuse(*args, **kwargs):
    raise AssertionError("a route loaded a model")
models.load_clip = refuse
import car_backend.engine.segmenter as segmenter
segmenter.load_clip = refuse
from car_backend.service.app import create_app
from tests.support.settings import tiny_settings
app = create_app(tiny_settings(redis_url={redis_url!r}))
client = app.test_client()
assert client.get('/health').status_code == 200
assert client.post('/setup', json={{'schema': open('label_config/brush.xml').read()}}).status_code == 200
assert client.get('/metrics').status_code == 200
app.extensions['car_backend'].close()
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_the_http_process_never_imports_torch(redis_url):
    """The server answers /setup and /health in milliseconds from its first second: torch stays out of it."""
    code = f"""
import sys
from car_backend.service.app import create_app
from car_backend.settings import Settings
app = create_app(Settings(redis_url={redis_url!r}))
client = app.test_client()
assert client.get('/health').status_code == 200
assert client.post('/setup', json={{'schema': open('label_config/polygon.xml').read()}}).status_code == 200
app.extensions['car_backend'].close()
print(sorted(m for m in ('torch', 'open_clip', 'cv2') if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("data, status, fragment", [
    (b"not json", 400, "JSON object"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"label_config": BRUSH}).encode(), 400, "'tasks' list"),
    (json.dumps({"tasks": [1, 2], "label_config": BRUSH}).encode(), 400, "JSON object"),
    (json.dumps({"tasks": []}).encode(), 400, "label_config"),
    (json.dumps({"tasks": [], "label_config": "<View/>"}).encode(), 400, "nothing to predict"),
])
def test_predict_rejects_malformed_requests(service_settings, make_client, data, status, fragment):
    resp = make_client(service_settings()).post("/predict", data=data, content_type="application/json")
    assert resp.status_code == status
    assert fragment in resp.get_json()["error"]


def test_predict_one_entry_per_task_in_order(service_settings, make_client, task_ids):
    """Cached, uncomputed, permanently failed and cached again: four entries, in order, one version."""
    settings = service_settings(predict_wait=0.3)
    a, b, c, d = task_ids(4)
    tasks = [{"id": a, "data": {"image": f"/data/upload/1/{a}.png"}},
             {"id": b, "data": {"image": f"/data/upload/1/{b}.png"}},
             {"id": c, "data": {"text": "no image here"}},
             {"id": d, "data": {"image": f"/data/upload/1/{d}.png"}}]
    _cache(settings, tasks[0], [_region("a")])
    _cache(settings, tasks[3], [_region("d1"), _region("d2")])
    client = make_client(settings)
    version = client.post("/setup", json={"schema": BRUSH}).get_json()["model_version"]
    started = time.monotonic()
    body = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH, "project": "1.1"}).get_json()
    assert time.monotonic() - started < 2.0
    first, second, third, fourth = body["results"]
    assert [r["id"] for r in first["result"]] == ["a"] and first["score"] == 0.7
    assert "result" not in second and second["status"] == "pending"
    assert third["result"] == [] and "no image" in third["error"]
    assert [r["id"] for r in fourth["result"]] == ["d1", "d2"]
    assert {e["model_version"] for e in body["results"]} == {version} == {body["model_version"]}


def test_a_task_is_delivered_once(service_settings, make_client, task_ids):
    settings = service_settings(predict_wait=0.0)
    (task_id,) = task_ids(1)
    task = {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"}}
    _cache(settings, task, [_region("x")])
    client = make_client(settings)
    request = {"tasks": [task], "label_config": BRUSH, "project": "1.1"}
    first = client.post("/predict", json=request).get_json()["results"][0]
    again = client.post("/predict", json=request).get_json()["results"][0]
    assert first["result"] and "result" not in again
    assert "already delivered" in again["reason"]


def test_interactive_answers_are_not_claimed(service_settings, make_client, task_ids):
    """Interactive suggestions are not stored by Label Studio, so they may be answered any number of times."""
    settings = service_settings(predict_wait=0.0)
    (task_id,) = task_ids(1)
    task = {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"}}
    _cache(settings, task, [_region("x")])
    client = make_client(settings)
    request = {"tasks": [task], "label_config": BRUSH, "params": {"context": {"result": [{"type": "keypointlabels"}]}}}
    for _ in range(2):
        assert client.post("/predict", json=request).get_json()["results"][0]["result"]


def test_redis_down_answers_fast_and_recovers(make_client, task_ids, tmp_path):
    """Health says so (still 200), /predict keeps every task pending, and both recover when Redis returns."""
    from tests.support.settings import tiny_settings

    port = free_port()
    settings = tiny_settings(redis_url=f"redis://127.0.0.1:{port}/0", predict_wait=1.0)
    client = make_client(settings)
    tasks = [{"id": t, "data": {"image": f"/data/upload/1/{t}.png"}} for t in task_ids(3)]
    request = {"tasks": tasks, "label_config": BRUSH, "project": "1.1"}

    started = time.monotonic()
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["redis"] == "down"
    assert health.get_json()["status"] == "DEGRADED"
    body = client.post("/predict", json=request).get_json()
    assert time.monotonic() - started < 1.5
    assert len(body["results"]) == 3 and all("result" not in e for e in body["results"])
    assert "unavailable" in body["results"][0]["reason"]
    assert client.post("/setup", json={"schema": BRUSH}).status_code == 200
    assert "car_redis_up 0.0" in client.get("/metrics").get_data(as_text=True)

    server = start_redis_server(port)
    try:
        assert client.get("/health").get_json()["redis"] == "ok"
        quick = client.post("/predict", json={**request, "tasks": tasks[:1]})  # queued, no worker: pending
        assert quick.status_code == 200
    finally:
        server.terminate()
        server.wait(10)


def test_basic_auth_guards_every_route(service_settings, make_client):
    client = make_client(service_settings(basic_auth_user="ls", basic_auth_pass="s3cret"))
    good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
    for method, path in [("get", "/"), ("get", "/health"), ("post", "/setup"), ("post", "/predict"),
                         ("post", "/webhook"), ("get", "/versions"), ("get", "/metrics"), ("get", "/status")]:
        # without any header: the bare probe and annotation events only (tests/service/test_auth.py)
        for headers in ({}, bad) if path not in ("/", "/health", "/webhook") else (bad,):
            resp = getattr(client, method)(path, headers=headers, json={})
            assert resp.status_code == 401, path
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/health").get_json() in ({"status": "UP"}, {"status": "DEGRADED"})
    assert client.get("/health", headers=good).status_code == 200
    assert client.post("/setup", headers=good, json={"schema": BRUSH}).status_code == 200


def test_webhook_ignores_other_events_and_rejects_malformed_annotation_events(service_settings, make_client):
    client = make_client(service_settings())
    task = {"id": 5, "data": {"image": "/data/upload/1/5.png"}}
    project = {"id": 1, "label_config": BRUSH}
    for body in ({"action": "TASKS_CREATED"}, {},
                 {"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "result": [], "was_cancelled": True},
                  "task": task, "project": project},
                 {"action": "ANNOTATION_UPDATED", "annotation": {"id": 3, "result": []}, "task": task,
                  "project": {"id": 1}}):
        resp = client.post("/webhook", json=body)
        assert resp.status_code == 200 and resp.get_json()["status"] == "ignored", body
    for body, fragment in (({"action": "ANNOTATION_CREATED"}, "'annotation' object"),
                           ({"action": "ANNOTATION_CREATED", "annotation": {"result": []}, "task": task,
                             "project": project}, "integer 'id'"),
                           ({"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "result": []}, "task": {"id": "x"},
                             "project": project}, "'task' object"),
                           ({"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "result": []}, "task": task},
                            "'project'")):
        resp = client.post("/webhook", json=body)
        assert resp.status_code == 400 and fragment in resp.get_json()["error"], body
    resp = client.post("/webhook", data=b"{oops", content_type="application/json")
    assert resp.status_code == 400 and "not JSON" in resp.get_json()["error"]
    queued = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "result": []},
                                           "task": task, "project": project})
    assert queued.status_code == 200 and queued.get_json()["status"] == "queued"


def test_metrics_exposes_queue_and_request_figures(service_settings, make_client, task_ids):
    client = make_client(service_settings(predict_wait=0.0))
    client.post("/predict", json={"tasks": [{"id": t, "data": {"image": f"{t}.png"}} for t in task_ids(2)],
                                  "label_config": BRUSH})
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("car_redis_up 1.0", 'car_queue_depth{queue="batch"}', "car_workers", "car_job_seconds_bucket",
                 'car_http_requests_total{endpoint="/predict",status="200"} 1.0',
                 'car_predict_entries_total{kind="pending"} 2.0', 'car_result_cache_total{outcome="miss"} 2.0',
                 'car_jobs_submitted_total{outcome="enqueued"} 2.0'):
        assert name in text, name
