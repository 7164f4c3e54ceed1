"""`car-backend worker` processes (see car_backend.testing.processes, shared with the benchmarks), and
`car-backend serve` processes for tests that need the real HTTP server."""

import subprocess
import sys
import time

import requests

from car_backend.settings import Settings
from car_backend.testing.processes import WORKER_START_TIMEOUT_S, WorkerProcess, start_worker, wait_for_worker
from car_backend.testing.settings import settings_env

__all__ = ["WORKER_START_TIMEOUT_S", "WorkerProcess", "serve", "start_worker", "wait_for_worker"]


def serve(settings: Settings, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """`car-backend serve` with `settings`; (process, base URL) once /health answers. Fails the test (with the
    server's output) when it exits or does not answer within `timeout` seconds."""
    server = subprocess.Popen([sys.executable, "-m", "car_backend.cli", "serve"], env=settings_env(settings),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://{settings.host}:{settings.port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(f"{base}/health", timeout=1)
            return server, base
        except requests.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.2)
