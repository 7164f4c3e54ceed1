"""`car-backend worker` processes for tests and benchmarks: exact settings, registered, stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from redis import Redis

from car_backend.queue import rqcompat
from car_backend.settings import Settings
from car_backend.testing.settings import settings_env

WORKER_START_TIMEOUT_S = 60.0


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


def wait_for_worker(redis_url: str, worker: WorkerProcess) -> None:
    """Until `worker` is registered in Redis; RuntimeError (with its output) if it exits or takes too long."""
    client = Redis.from_url(redis_url)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    try:
        while not client.sismember(rqcompat.WORKERS_KEY, rqcompat.WORKER_KEY_PREFIX + worker.name):
            if worker.proc.poll() is not None:
                raise RuntimeError(f"worker {worker.name} exited ({worker.proc.returncode}):\n{worker.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker.name} did not register:\n{worker.output()}")
            time.sleep(0.05)
    finally:
        client.close()
