"""REDIS_URL with a password (redis-server --requirepass) and rediss://: a real worker runs a real job."""

from __future__ import annotations

import subprocess
import sys

import pytest
from redis import Redis
from redis.connection import SSLConnection
from redis.exceptions import AuthenticationError, ResponseError

from car_backend.queue.connection import ROLES, redis_client
from car_backend.testing.redis import free_port, start_redis_server
from tests.support.label_configs import label_config
from tests.support.settings import settings_env, tiny_settings

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-redis-pass"


@pytest.fixture
def protected_redis():
    port = free_port()
    proc = start_redis_server(port, password=PASSWORD)
    yield port
    proc.terminate()
    proc.wait(10)


def check(env: dict[str, str], name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "car_backend.cli", "worker", "--check", "--name", name],
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_worker_runs_a_job_on_a_password_protected_redis_and_its_health_check_sees_it(
        protected_redis, fake_ls, spawn_worker, make_client, task_ids):
    with pytest.raises((AuthenticationError, ResponseError)):  # the server really requires the password
        Redis(host="127.0.0.1", port=protected_redis).ping()
    url = f"redis://:{PASSWORD}@127.0.0.1:{protected_redis}/0"
    settings = tiny_settings(redis_url=url, label_studio_url=fake_ls.url, label_studio_api_key=fake_ls.api_key,
                             predict_wait=60.0)
    assert PASSWORD not in repr(settings) and ":***@127.0.0.1" in repr(settings)
    worker = spawn_worker(settings)
    client = make_client(settings)
    (task_id,) = task_ids(1)
    resp = client.post("/predict", json={"tasks": [{"id": task_id, "data": {"image": f"{fake_ls.url}/img/pw.png"}}],
                                         "label_config": label_config("brush")})
    (entry,) = resp.get_json()["results"]
    assert "result" in entry and "error" not in entry, entry  # computed by the worker, through the password
    assert client.get("/health").get_json()["workers"] == 1

    env = settings_env(settings)
    alive = check(env, worker.name)
    assert alive.returncode == 0 and f"worker {worker.name} is alive" in alive.stdout
    wrong = check({**env, "REDIS_URL": f"redis://:not-it@127.0.0.1:{protected_redis}/0"}, worker.name)
    assert wrong.returncode == 1 and "cannot read worker heartbeats" in wrong.stdout
    assert "not-it" not in wrong.stdout + wrong.stderr
    assert check(env, "no-such-worker").returncode == 1
    worker.stop()
    gone = check(env, worker.name)
    assert gone.returncode == 1, gone.stdout
    assert PASSWORD not in worker.output()


@pytest.mark.parametrize("role", ROLES)
def test_rediss_urls_use_tls(role):
    client = redis_client(f"rediss://:{PASSWORD}@127.0.0.1:6390/0", role)
    assert client.connection_pool.connection_class is SSLConnection
    assert client.connection_pool.connection_kwargs["password"] == PASSWORD
