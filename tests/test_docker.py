"""The Docker deployment: the image's health check (server with basic auth, worker heartbeat) and compose."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from car_backend.service.app import create_app
from car_backend.service.backend import Backend
from tests.support.settings import settings_env

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def healthcheck():
    spec = importlib.util.spec_from_file_location("car_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dockerfile_runs_the_health_check_script():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "COPY docker/healthcheck.py /usr/local/lib/car-backend/healthcheck.py" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "python3 /usr/local/lib/car-backend/healthcheck.py" in dockerfile


def test_the_server_health_check_works_with_basic_auth(service_settings):
    settings = service_settings(basic_auth_user="admin", basic_auth_pass="pa:ss")
    backend = Backend(settings)
    server = make_server("127.0.0.1", 0, create_app(settings, backend), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check = healthcheck().main
        cmdline = ["/opt/venv/bin/python3", "/opt/venv/bin/car-backend", "serve", "--port", str(server.server_port)]
        assert check(cmdline, {"BASIC_AUTH_USER": "admin", "BASIC_AUTH_PASS": "pa:ss"}) == 0
        assert check(cmdline, {"BASIC_AUTH_USER": "admin", "BASIC_AUTH_PASS": "wrong"}) == 1
        assert check(cmdline, {}) == 1  # without credentials the route answers 401
        assert check(["car-backend", "serve"], {"PORT": str(server.server_port), "BASIC_AUTH_USER": "admin",
                                                "BASIC_AUTH_PASS": "pa:ss"}) == 0
    finally:
        server.shutdown()
        backend.close()


def test_a_worker_container_checks_its_own_heartbeat(service_settings, spawn_worker):
    settings = service_settings()
    worker = spawn_worker(settings)
    check = healthcheck().main
    env = settings_env(settings)
    assert check(["/opt/venv/bin/car-backend", "worker", "--name", worker.name], env) == 0
    worker.stop()
    assert check(["/opt/venv/bin/car-backend", "worker", "--name", worker.name], env) == 1


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_is_valid_and_needs_a_redis_password():
    compose = ["docker-compose", "-f", str(DOCKER / "docker-compose.yml"), "config"]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    good = subprocess.run(compose, env={**env, "REDIS_PASSWORD": "pw123"}, capture_output=True, text=True,
                          timeout=60)
    assert good.returncode == 0, good.stderr
    assert "--requirepass" in good.stdout and "--appendonly" in good.stdout and "redis-data" in good.stdout
    assert "redis://:pw123@redis:6379/0" in good.stdout
    assert "worker" in good.stdout and "--check" in good.stdout
    missing = subprocess.run(compose + ["-q"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr
