"""Authentication by default: what a caller without credentials may reach, and what `serve` refuses."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid

import pytest

from car_backend.service.app import serve_refusal
from car_backend.service.projects import Projects
from tests.support.settings import settings_env, tiny_settings

BRUSH = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
         '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')
USER, PASSWORD = "operator", "pa:ss word"


def _basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


GOOD = _basic(USER, PASSWORD)


@pytest.fixture
def authed(service_settings, make_client):
    """A client of an app with basic auth on, on a queue of its own."""
    return make_client(service_settings(basic_auth_user=USER, basic_auth_pass=PASSWORD,
                                        queue=f"auth-{uuid.uuid4().hex[:8]}"))


def test_health_without_credentials_says_only_up_or_degraded(authed, fake_ls):
    anonymous = authed.get("/health")
    assert anonymous.status_code == 200
    assert set(anonymous.get_json()) == {"status"} and anonymous.get_json()["status"] in ("UP", "DEGRADED")
    assert fake_ls.url.encode() not in anonymous.data and b"model_version" not in anonymous.data
    assert set(authed.get("/").get_json()) == {"status"}
    full = authed.get("/health", headers=GOOD).get_json()
    assert full["model_version"] and "warnings" in full and "pending_failures" in full


def test_wrong_credentials_are_refused_everywhere_even_on_health(authed):
    for headers in (_basic(USER, "wrong"), _basic("someone", PASSWORD), {"Authorization": "Bearer abc"}):
        response = authed.get("/health", headers=headers)
        assert response.status_code == 401 and "Basic" in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize("method, path, body", [
    ("get", "/status?project=1", None),
    ("get", "/metrics", None),
    ("get", "/versions", None),
    ("post", "/setup", {"project": "1.1", "schema": BRUSH}),
    ("post", "/predict", {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}], "label_config": BRUSH}),
    ("post", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}}),
])
def test_protected_routes_need_credentials(authed, method, path, body):
    anonymous = getattr(authed, method)(path, json=body)
    assert anonymous.status_code == 401, anonymous.get_json()
    assert anonymous.get_json() == {"error": "authentication required"}
    if path != "/webhook":  # START_TRAINING with credentials: see below
        assert getattr(authed, method)(path, json=body, headers=GOOD).status_code == 200


def test_annotation_events_are_accepted_without_credentials(authed):
    """Label Studio's project webhook carries none: the event is looked at (believed only for its ids)."""
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "PROJECT_UPDATED"):
        response = authed.post("/webhook", json={"action": action, "project": {"id": 1}})
        assert response.status_code in (200, 400), (action, response.get_json())


def test_start_training_with_credentials_queues_one_fit_per_project(authed, fake_ls):
    project = {"id": 700000 + uuid.uuid4().int % 100000, "created_at": "2026-12-06T04:53:26.123456Z"}
    fake_ls.add_project(project["id"], BRUSH, [], created=1796532806)
    first = authed.post("/webhook", json={"action": "START_TRAINING", "project": project}, headers=GOOD)
    assert first.status_code == 200 and first.get_json()["status"] == "queued"
    for i in range(20):  # another creation stamp in the payload: Label Studio's stamp names the project
        forged = {**project, "created_at": f"2020-01-{1 + i:02d}T00:00:00Z"}
        again = authed.post("/webhook", json={"action": "START_TRAINING", "project": forged}, headers=GOOD)
        assert again.get_json()["status"] == "already training"


def test_start_training_acts_only_for_a_project_label_studio_confirms(authed, fake_ls):
    unknown = 800000 + uuid.uuid4().int % 100000
    for _ in range(3):
        response = authed.post("/webhook", json={"action": "START_TRAINING", "project": {"id": unknown}},
                               headers=GOOD)
        assert response.status_code == 404 and "fit_job" not in response.get_json()
    status = authed.get(f"/status?project={unknown}", headers=GOOD).get_json()
    assert status.get("fit") is None, status


@pytest.mark.parametrize("project", [
    "1." + "9" * 2_000_000, "9" * 13, "1.2.3", "abc", " 5", "5\n", -1, True, 10 ** 12, None, ["5"],
    {"id": "5"}, {"id": True}, {"id": 10 ** 12}, {"id": 5, "created_at": "x" * 100}, {"id": 5, "created_at": 5},
])
def test_start_training_refuses_project_ids_that_are_not_bounded_digits(authed, project):
    response = authed.post("/webhook", json={"action": "START_TRAINING", "project": project}, headers=GOOD)
    assert response.status_code == 400 and "project" in response.get_json()["error"]
    assert len(response.data) < 1000


def test_without_credentials_configured_on_loopback_every_route_is_open(service_settings, make_client):
    """The one-machine quick start: HOST defaults to 127.0.0.1 and nothing asks for credentials."""
    assert tiny_settings().host == "127.0.0.1"
    client = make_client(service_settings())
    assert "model_version" in client.get("/health").get_json()
    assert client.post("/setup", json={"project": "1.1", "schema": BRUSH}).status_code == 200


def test_serve_refuses_a_non_loopback_host_without_credentials():
    refusal = serve_refusal(tiny_settings(host="0.0.0.0"))
    assert "BASIC_AUTH_USER" in refusal and "BASIC_AUTH_PASS" in refusal and "Use basic auth" in refusal
    assert "Connect Model" in refusal and "CAR_INSECURE_NO_AUTH" in refusal
    for allowed in (tiny_settings(host="0.0.0.0", basic_auth_user="u", basic_auth_pass="p"),
                    tiny_settings(host="0.0.0.0", insecure_no_auth=True),
                    tiny_settings(host="127.0.0.1"), tiny_settings(host="::1"), tiny_settings(host="localhost")):
        assert serve_refusal(allowed) is None
    assert serve_refusal(tiny_settings(host="myhost.example")) is not None  # a name may resolve to anything
    env = settings_env(tiny_settings(host="0.0.0.0", redis_url=""))
    done = subprocess.run([sys.executable, "-m", "car_backend.cli", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing to serve on 0.0.0.0" in done.stderr, done.stderr
    assert "Use basic auth" in done.stderr


def test_the_insecure_setting_is_read_from_the_environment():
    from car_backend.settings import Settings, SettingsError
    assert Settings.from_env({"CAR_INSECURE_NO_AUTH": "true"}).insecure_no_auth is True
    assert Settings.from_env({"CAR_INSECURE_NO_AUTH": "False"}).insecure_no_auth is False
    assert Settings.from_env({}).insecure_no_auth is False
    with pytest.raises(SettingsError, match="CAR_INSECURE_NO_AUTH"):
        Settings.from_env({"CAR_INSECURE_NO_AUTH": "maybe"})


def test_a_label_config_over_the_limit_is_refused_before_parsing(service_settings, make_client):
    client = make_client(service_settings(max_label_config_bytes=4096))
    big = BRUSH.replace("<View>", "<View>" + " " * 5000)
    for path, body in (("/setup", {"project": "1.1", "schema": big}),
                       ("/predict", {"tasks": [], "label_config": big})):
        response = client.post(path, json=body)
        assert response.status_code == 413, response.get_json()
        assert "CAR_MAX_LABEL_CONFIG_BYTES=4096" in response.get_json()["error"]
    assert client.post("/setup", json={"project": "1.1", "schema": BRUSH}).status_code == 200


def test_the_parse_cache_is_bounded_in_bytes(service_settings, make_client, monkeypatch):
    monkeypatch.setattr("car_backend.service.projects.CONFIG_CACHE_BYTES", 64 * 1024)
    client = make_client(service_settings())
    projects: Projects = client.application.extensions["car_backend"].projects
    for i in range(12):
        labels = "".join(f'<Label value="l{i}-{j}"/>' for j in range(600))  # ~12 KiB each
        config = f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}' \
                 '</BrushLabels></View>'
        assert client.post("/setup", json={"project": "1.1", "schema": config}).status_code == 200
    assert 0 < projects._parsed_bytes <= 64 * 1024 and len(projects._parsed) < 12
