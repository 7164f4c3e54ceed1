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
        assert check(cmdline, {}) == 0  # without credentials the probe still answers (UP/DEGRADED only)
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


REQUIRED = {"REDIS_PASSWORD": "pw123", "BASIC_AUTH_USER": "operator", "BASIC_AUTH_PASS": "pa55"}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_compose_is_valid_and_needs_a_redis_password_and_credentials():
    compose = ["docker-compose", "-f", str(DOCKER / "docker-compose.yml"), "config"]
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED and k != "CAR_PUBLISH_ADDRESS"}
    good = subprocess.run(compose, env={**env, **REQUIRED}, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "--requirepass" in good.stdout and "--appendonly" in good.stdout and "redis-data" in good.stdout
    assert "redis://:pw123@redis:6379/0" in good.stdout
    assert "worker" in good.stdout and "--check" in good.stdout
    for name in REQUIRED:
        missing = subprocess.run(compose + ["-q"], env={**env, **{k: v for k, v in REQUIRED.items() if k != name}},
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0 and name in missing.stderr


def _compose() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_requires_credentials_like_the_redis_password():
    server = _compose()["services"]["server"]
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        assert server["environment"][name].startswith(f"${{{name}:?"), server["environment"][name]
    assert "BASIC_AUTH" not in str(_compose()["services"]["worker"]["environment"])  # workers need none


def test_compose_publishes_only_on_loopback_by_default():
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith(("${CAR_PUBLISH_ADDRESS:-127.0.0.1}:", "${CAR_REDIS_BIND:-127.0.0.1}:")), (name, port)


def test_every_container_runs_as_a_non_root_user():
    dockerfile = (DOCKER / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert dockerfile.index(f"USER {users[-1]}") > max(i for i, line in enumerate(dockerfile) if line.startswith("RUN "))
    for name, service in _compose()["services"].items():
        built_here = service.get("image") == "car-backend:latest"
        assert built_here or str(service.get("user", "root")).split(":")[0] not in ("root", "0"), name
