"""Responsiveness under load (issue 15), with the real Redis: /health does a constant amount of work, /predict
answers at once when no worker is alive, job keys are computed once per /predict, the embedded worker is a
process of its own (a job holding the GIL does not stall /health), and an interactive call promotes a queued
batch job."""

from __future__ import annotations

import os
import signal
import time
import uuid

import numpy as np
import pytest
import redis.client
from rq.job import Job

from car_backend.pipeline import spec as spec_module
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.queue.jobqueue import SERIALIZER
from car_backend.review.agreement import compare
from car_backend.review.store import ReviewStore
from car_backend.service.app import create_app
from car_backend.service.backend import Backend
from tests.support.processes import serve
from tests.support.service import BRUSH, predict


class RedisCalls:
    """Counts the commands every Redis client of this process sends (pipelined ones included)."""

    def __init__(self, monkeypatch):
        self.commands = 0
        single, batch = redis.client.Redis.execute_command, redis.client.Pipeline.execute

        def execute_command(client, *args, **options):
            self.commands += 1
            return single(client, *args, **options)

        def execute(pipe, *args, **options):
            self.commands += len(pipe.command_stack)
            return batch(pipe, *args, **options)

        monkeypatch.setattr(redis.client.Redis, "execute_command", execute_command)
        monkeypatch.setattr(redis.client.Pipeline, "execute", execute)

    def during(self, call) -> int:
        before = self.commands
        call()
        return self.commands - before


def _review_data(redis_client, projects: list[ProjectId]) -> None:
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    agreement = compare({"car": mask}, {"car": mask, "dog": ~mask})
    review = ReviewStore(redis_client)
    for index, project in enumerate(projects):
        review.put_agreement(project, index, "car-test", agreement)


def test_health_makes_the_same_few_redis_calls_with_1000_projects_of_review_data(
        service_settings, make_client, redis, monkeypatch):
    settings = service_settings()
    client = make_client(settings)
    calls = RedisCalls(monkeypatch)
    # Projects of their own (/metrics labels a project by its Label Studio id): ids no other test uses.
    base = 10**9 + uuid.uuid4().int % 10**9 * 10**4
    instance = instance_of(settings.label_studio_url)
    _review_data(redis, [ProjectId(instance, base - 1, 1700000000)])
    few = calls.during(lambda: client.get("/health"))
    _review_data(redis, [ProjectId(instance, base + i, 1700000000) for i in range(1000)])
    many = calls.during(lambda: client.get("/health"))
    assert many == few <= 10, (few, many)

    # The review figures are at /metrics, built once and then served from the cache.
    first = calls.during(lambda: client.get("/metrics"))
    text = client.get("/metrics").get_data(as_text=True)
    assert f'car_review_tasks{{model_version="car-test",project="{base + 999}"}} 1.0' in text
    assert first > 1000 and calls.during(lambda: client.get("/metrics")) < 20


def test_without_a_live_worker_predict_answers_at_once_and_health_says_so(service_settings, make_client, task_ids):
    client = make_client(service_settings(predict_wait=30.0, queue=f"idle-{uuid.uuid4().hex[:8]}"))
    tasks = [{"id": t, "data": {"image": f"{t}.png"}} for t in task_ids(3)]
    started = time.monotonic()
    body = predict(client, tasks)
    assert time.monotonic() - started < 10  # not the 30 s CAR_PREDICT_WAIT
    assert all("result" not in e for e in body["results"])
    assert all("no worker is running" in e["reason"] for e in body["results"]), body
    health = client.get("/health")
    assert health.status_code == 200
    assert health.get_json()["workers"] == 0 and health.get_json()["status"] == "DEGRADED"
    assert health.get_json()["queue"]["batch"] == 3  # the jobs wait for a worker


def test_predict_computes_each_job_key_once(service_settings, make_client, task_ids, monkeypatch):
    client = make_client(service_settings(predict_wait=0.0))
    computed = []
    original = spec_module.job_key
    monkeypatch.setattr(spec_module, "job_key", lambda spec: computed.append(1) or original(spec))
    tasks = [{"id": t, "data": {"image": f"{t}.png"}} for t in task_ids(300)]
    body = predict(client, tasks)
    assert len(body["results"]) == 300
    assert len(computed) == 300  # one job (and one key) per task


@pytest.mark.integration
def test_health_answers_while_an_embedded_job_holds_the_gil(service_settings, tmp_path, monkeypatch):
    from car_backend.queue.jobqueue import JobName
    from tests.support.gil import HOLD, worker_pythonpath

    # A worker runs only JobName jobs now: the embedded worker's segment jobs given {HOLD: s} hold the GIL.
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(tmp_path / "gil"))
    settings = service_settings(redis_url="", predict_wait=5.0)
    backend = Backend(settings)
    try:
        client = create_app(settings, backend).test_client()
        worker = backend._embedded
        assert worker.alive() and worker.pid != os.getpid()
        job = backend.queue.batch.enqueue(JobName.SEGMENT.value, {HOLD: 3.0}, result_ttl=60)
        deadline = time.monotonic() + 60  # the worker process starts (imports) first
        while Job.fetch(job.id, connection=backend.redis, serializer=SERIALIZER).get_status() != "started":
            assert time.monotonic() < deadline and worker.alive()
            time.sleep(0.02)
        answered = []
        for _ in range(5):
            started = time.monotonic()
            resp = client.get("/health")
            answered.append(time.monotonic() - started)
            assert resp.status_code == 200 and resp.get_json()["mode"] == "embedded"
            time.sleep(0.2)
        # Still holding the GIL in the worker process while /health answered, each time within Label Studio's 1 s.
        assert Job.fetch(job.id, connection=backend.redis, serializer=SERIALIZER).get_status() == "started"
        assert max(answered) < 1.0, answered
        assert client.get("/health").get_json()["workers"] == 1
        while Job.fetch(job.id, connection=backend.redis, serializer=SERIALIZER).get_status() == "started":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert Job.fetch(job.id, connection=backend.redis, serializer=SERIALIZER).return_value() == 3.0  # held it
    finally:
        backend.close()
    assert not worker.alive()


@pytest.mark.integration
def test_the_embedded_worker_dies_with_its_server(service_settings, tmp_path):
    """A server killed with SIGKILL (no clean-up) leaves no worker behind."""
    import subprocess
    import sys

    from tests.support.settings import settings_env

    env = settings_env(service_settings(redis_url=""))
    env.pop("REDIS_URL")
    pid_file = tmp_path / "worker.pid"
    code = f"""
import time
from car_backend.service.backend import Backend
from car_backend.settings import Settings
backend = Backend(Settings.from_env())
open({str(pid_file)!r}, "w").write(str(backend._embedded.pid))
time.sleep(120)
"""
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        worker_pid = int(pid_file.read_text())
        os.kill(worker_pid, 0)  # running
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    deadline = time.monotonic() + 30
    while _running(worker_pid):
        assert time.monotonic() < deadline, "the embedded worker outlived its server"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] if os.path.exists(f"/proc/{pid}/stat") else ""
    return status != "Z"


def _slow_body(base: str, path: str, results: list, drip_s: float = 0.5, bytes_total: int = 1000) -> None:
    """A client that sends its headers, then one byte of its body every `drip_s`; appends what it got back."""
    import socket

    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {bytes_total}\r\n\r\n".encode())
        try:
            for _ in range(bytes_total):
                conn.sendall(b" ")
                time.sleep(drip_s)
        except OSError:
            pass  # the server closed the connection on us
        try:
            results.append(conn.recv(4096).decode(errors="replace"))
        except OSError as exc:
            results.append(f"error: {exc}")


@pytest.mark.integration
def test_health_and_setup_answer_under_waiting_predicts_and_slow_clients(service_settings, spawn_worker, fake_ls,
                                                                         task_ids):
    """Real server (waitress): 10 /predict calls waiting on slow jobs (6 allowed to wait), 8 clients dripping their
    bodies; /health and /setup answer within Label Studio's timeouts all along, the slow clients get 408."""
    import threading

    import requests

    from tests.support.redis import free_port

    queue = f"load-{uuid.uuid4().hex[:8]}"
    spawn_worker(service_settings(queue=queue))
    settings = service_settings(queue=queue, port=free_port(), host="127.0.0.1", predict_wait=12.0,
                                predict_waiters=6, request_timeout=3.0, log_level="WARNING")
    server, base = serve(settings)
    answers: list[tuple[float, dict]] = []
    slow: list[str] = []

    def waiting_predict(index: int) -> None:
        tasks = [{"id": t, "data": {"image": f"{fake_ls.url}/slow/20/load-{queue}-{index}-{t}.png"}}
                 for t in task_ids(3)]
        started = time.monotonic()
        body = requests.post(f"{base}/predict", json={"tasks": tasks, "label_config": BRUSH}, timeout=60).json()
        answers.append((time.monotonic() - started, body))

    try:
        threads = [threading.Thread(target=waiting_predict, args=(i,)) for i in range(10)]
        threads += [threading.Thread(target=_slow_body, args=(base, "/predict", slow)) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # every call is in: waiting on jobs, or dripping its body
        health_s, setup_s = [], []
        for _ in range(10):
            started = time.monotonic()
            assert requests.get(f"{base}/health", timeout=1).status_code == 200
            health_s.append(time.monotonic() - started)
            started = time.monotonic()
            assert requests.post(f"{base}/setup", json={"project": "1.1", "schema": BRUSH}, timeout=3).ok
            setup_s.append(time.monotonic() - started)
            time.sleep(0.4)
        for thread in threads:
            thread.join(60)
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert len(answers) == 10 and len(slow) == 8, output
    busy = [body for _, body in answers if "waiting for jobs already" in body["results"][0].get("reason", "")]
    waited = [seconds for seconds, body in answers if body not in busy]
    assert len(busy) == 4 and len(waited) == 6, [body["results"][0] for _, body in answers]
    assert all(seconds >= 10 for seconds in waited), waited  # those waited up to CAR_PREDICT_WAIT
    assert all(reply.startswith("HTTP/1.1 408") for reply in slow), slow


def test_jobs_left_unqueued_at_the_deadline_are_pending_and_unclaimed(service_settings, make_client, task_ids, redis,
                                                                     monkeypatch):
    """No time left to queue (CAR_PREDICT_WAIT 0, no queueing grace): every task is pending with the reason,
    and no delivery claim is taken for a task that is not answered."""
    from car_backend.queue.ledger import CLAIMED, DeliveryLedger
    from car_backend.service import predictor

    monkeypatch.setattr(predictor, "QUEUE_AT_LEAST_S", 0.0)
    settings = service_settings(predict_wait=0.0, queue=f"late-{uuid.uuid4().hex[:8]}")
    client = make_client(settings)
    ids = task_ids(4)
    body = predict(client, [{"id": t, "data": {"image": f"{t}.png"}} for t in ids])
    assert all("result" not in e and "not queued" in e["reason"] for e in body["results"]), body
    # The claims live in the project's ledger entries (predict() names project "1.1"): none holds one.
    entries = DeliveryLedger(redis).state_of(ProjectId(instance_of(settings.label_studio_url), 1, 1), ids)
    assert not any(e.state in CLAIMED and e.version == body["model_version"] for e in entries.values()), entries
    assert client.get("/health").get_json()["queue"]["batch"] == 0
