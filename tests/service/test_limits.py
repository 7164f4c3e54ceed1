"""Request limits: body bytes (413 before the body is read, chunked bodies cut), tasks per /predict, labels
per task and label length (an error entry for that task only)."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from werkzeug.serving import make_server

from car_backend.service.app import create_app
from car_backend.service.backend import Backend
from tests.support.label_configs import label_config

BRUSH = label_config("brush")
DYNAMIC = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image" value="$options">'
           '<Label value="cat"/></BrushLabels></View>')


@pytest.fixture
def live_server(service_settings):
    """The real app on a real HTTP server (127.0.0.1), for what a test client cannot show: the socket."""
    servers = []

    def start(**overrides):
        settings = service_settings(**overrides)
        backend = Backend(settings)
        server = make_server("127.0.0.1", 0, create_app(settings, backend), threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, backend))
        return server.server_port

    yield start
    for server, backend in servers:
        server.shutdown()
        backend.close()


def exchange(port: int, head: bytes, body_parts: list[bytes] = ()) -> tuple[int, dict]:
    """Send a raw request (head, then body parts) and read the status and JSON answer; 5 s socket timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the whole body: what we want
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1] or b"{}")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(live_server):
    port = live_server(max_request_bytes=10_000)
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n")  # a gigabyte announced, none of it sent
    status, body = exchange(port, head)
    assert status == 413 and "CAR_MAX_REQUEST_BYTES=10000" in body["error"] and "1000000000" in body["error"]


def test_a_chunked_body_is_cut_at_the_limit(live_server):
    port = live_server(max_request_bytes=10_000)
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"x" * 4000
    parts = [b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(10)] + [b"0\r\n\r\n"]
    status, body = exchange(port, head, parts)
    assert status == 413 and "CAR_MAX_REQUEST_BYTES=10000" in body["error"]


def test_a_body_within_the_limit_is_served(make_client, service_settings):
    client = make_client(service_settings(max_request_bytes=10_000))
    assert client.post("/setup", json={"schema": BRUSH}).status_code == 200
    resp = client.post("/setup", json={"schema": BRUSH, "padding": "x" * 20_000})
    assert resp.status_code == 413 and "CAR_MAX_REQUEST_BYTES" in resp.get_json()["error"]


def test_too_many_tasks_is_a_413_that_names_the_setting(make_client, service_settings, task_ids):
    client = make_client(service_settings(max_tasks=3, predict_wait=0.0))
    tasks = [{"id": t, "data": {"image": f"/data/upload/1/{t}.png"}} for t in task_ids(4)]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH})
    assert resp.status_code == 413
    assert "4 tasks" in resp.get_json()["error"] and "CAR_MAX_TASKS=3" in resp.get_json()["error"]
    assert client.post("/predict", json={"tasks": tasks[:3], "label_config": BRUSH}).status_code == 200


def test_too_many_or_too_long_labels_fail_that_task_only(make_client, service_settings, task_ids):
    """Each is that task's own answer, pending with the reason (a setting decides it, so it must not become a
    permanent empty prediction); raising the limits plans it."""
    client = make_client(service_settings(max_labels=5, max_label_length=40, predict_wait=0.0))
    ok, many, long_label = task_ids(3)
    tasks = [{"id": ok, "data": {"image": "/data/upload/1/a.png", "options": ["dog", "car"]}},
             {"id": many, "data": {"image": "/data/upload/1/b.png", "options": [f"thing {i}" for i in range(10)]}},
             {"id": long_label, "data": {"image": "/data/upload/1/c.png", "options": ["a" * 41]}}]
    resp = client.post("/predict", json={"tasks": tasks, "label_config": DYNAMIC})
    assert resp.status_code == 200
    first, second, third = resp.get_json()["results"]
    assert "error" not in first  # planned and queued (pending: no worker here)
    assert "result" not in second and "11 labels" in second["reason"] and "CAR_MAX_LABELS=5" in second["reason"]
    assert "result" not in third and "41 characters" in third["reason"] and "CAR_MAX_LABEL_LENGTH=40" in third["reason"]
    raised = make_client(service_settings(max_labels=50, max_label_length=80, predict_wait=0.0))
    again = raised.post("/predict", json={"tasks": tasks, "label_config": DYNAMIC}).get_json()["results"]
    assert all("CAR_MAX_LABEL" not in entry.get("reason", "") and "error" not in entry for entry in again), again


# ---- exposure ----


@pytest.mark.parametrize(("overrides", "warned"), [
    ({"host": "0.0.0.0"}, True),
    ({"host": "192.168.1.20"}, True),
    ({"host": "::"}, True),
    ({"host": "127.0.0.1"}, False),
    ({"host": "localhost"}, False),
    ({"host": "0.0.0.0", "basic_auth_user": "u", "basic_auth_pass": "p"}, False),
    ({"host": "0.0.0.0", "label_studio_api_key": ""}, True),  # /status and trainings are open without a key too
])
def test_a_public_bind_without_auth_is_warned_at_start_and_in_health(
        make_client, service_settings, caplog, overrides, warned):
    caplog.set_level("WARNING", logger="car_backend.service.app")
    settings = service_settings(**overrides)
    client = make_client(settings)
    headers = {"Authorization": "Basic dTpw"} if settings.basic_auth_user else {}  # u:p
    # /health also warns that no worker serves the queue here; only the exposure warning is this test's
    warnings = [w for w in client.get("/health", headers=headers).get_json()["warnings"] if "BASIC_AUTH_USER" in w]
    logged = [r.getMessage() for r in caplog.records if "BASIC_AUTH_USER" in r.getMessage()]
    if warned:
        assert len(warnings) == 1 and warnings == logged
        assert settings.host in warnings[0] and "LABEL_STUDIO_API_KEY" in warnings[0]
        assert "BASIC_AUTH_USER and BASIC_AUTH_PASS" in warnings[0] and "HOST=127.0.0.1" in warnings[0]
        assert not settings.label_studio_api_key or settings.label_studio_api_key not in warnings[0]
    else:
        assert warnings == [] and logged == []
