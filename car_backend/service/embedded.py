"""The embedded worker of `serve` and `prelabel --project` without REDIS_URL: a child process of the server."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

from car_backend.settings import Settings

log = logging.getLogger(__name__)


class EmbeddedWorkerProcess:
    """The embedded worker of `serve` and `prelabel --project` without REDIS_URL: a `car-backend worker`
    child process (the same code path as a deployment's workers) on the embedded Redis at `redis_url`.

    A job holding the GIL (dense CRF on a large image) runs in that process, so it cannot stall the HTTP
    threads. The child dies with this process: `stop()` warm-stops it (SIGTERM, then SIGKILL after
    `timeout`), and it watches its parent (`--parent-pid`), exiting when the parent is gone (killed, crashed).
    """

    def __init__(self, settings: Settings, redis_url: str):
        env = {k: v for k, v in os.environ.items() if k not in settings.to_env()}
        env.update(settings.to_env())
        env["REDIS_URL"] = redis_url
        self.name = f"embedded-{socket.gethostname()}-{os.getpid()}"
        self._args = [sys.executable, "-m", "car_backend.cli", "worker", "--name", self.name,
                      "--parent-pid", str(os.getpid())]
        self._env = env
        self._proc: subprocess.Popen | None = None

    def start(self) -> EmbeddedWorkerProcess:
        self._proc = subprocess.Popen(self._args, env=self._env, stdin=subprocess.DEVNULL)
        log.info("embedded worker started (process %d)", self._proc.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded worker %d did not stop within %.0f s; killing it", self._proc.pid, timeout)
            self._proc.kill()
            self._proc.wait(10)
