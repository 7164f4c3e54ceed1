"""`car-backend worker --check`: whether this host's worker is alive, from its heartbeat in Redis.

A container's health check runs in a process of its own, so it cannot ask the worker directly; it reads the
RQ registration the worker renews (`last_heartbeat`, every few seconds while idle or busy) and exits 0 when
a worker of this host (`<hostname>-<pid>`, or the `--name` given) beat within WORKER_TTL_S + 5 seconds. It
warns (exit status unchanged) when its settings, which a container's health check shares with its worker,
lack LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY: such a worker computes, but leaves late writes to others.
Interactive lanes (`<worker>-interactive`, worker.process.Lane) do not count: a worker restarts its lane, and
a lane alone serves no batch job.
"""

from __future__ import annotations

import argparse
import logging
import socket
from dataclasses import dataclass
from datetime import datetime, timezone

from redis import Redis, RedisError

from car_backend.queue import rqcompat
from car_backend.queue.connection import redis_client
from car_backend.queue.jobqueue import MAX_SILENCE_S
from car_backend.settings import Settings
from car_backend.worker.context import NO_WRITES
from car_backend.worker.lanes import is_lane

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Beat:
    """One registered worker: its name and how long ago it last beat (None: never, or it died)."""

    name: str
    silence_s: float | None


def worker_beats(redis: Redis, prefix: str) -> list[Beat]:
    """The registered workers whose name is `prefix` or starts with `prefix-`, interactive lanes left out;
    RedisError passes through."""
    namespace = rqcompat.WORKER_KEY_PREFIX
    keys = sorted(rqcompat.as_text(k) for k in redis.smembers(rqcompat.WORKERS_KEY))
    keys = [k for k in keys if (k[len(namespace):] == prefix or k[len(namespace):].startswith(prefix + "-"))
            and not is_lane(k[len(namespace):])]
    if not keys:
        return []
    with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, "last_heartbeat", "death")
        found = pipe.execute()
    now = datetime.now(timezone.utc)
    beats = []
    for key, (last, death) in zip(keys, found, strict=True):
        alive = last is not None and death is None
        silence = (now - rqcompat.beat_time(last)).total_seconds() if alive else None
        beats.append(Beat(key[len(namespace):], silence))
    return beats


def check(settings: Settings, prefix: str) -> tuple[bool, str]:
    """(alive, what to print) for the workers named `prefix`."""
    if not settings.redis_url:
        return False, "REDIS_URL is not set: there is no worker to check"
    redis = redis_client(settings.redis_url, "cli")
    try:
        beats = worker_beats(redis, prefix)
    except RedisError as exc:  # redis-py's messages name host and port, never the password
        return False, f"cannot read worker heartbeats from Redis: {exc}"
    finally:
        redis.close()
    alive = [b for b in beats if b.silence_s is not None and b.silence_s <= MAX_SILENCE_S]
    if alive:
        return True, f"worker {alive[0].name} is alive (heartbeat {alive[0].silence_s:.0f} s ago)"
    if beats:
        return False, f"worker {beats[0].name} has not sent a heartbeat for over {MAX_SILENCE_S} s"
    return False, f"no worker named {prefix!r} (or {prefix}-...) is registered in Redis"


def worker_command(args: argparse.Namespace, settings: Settings) -> int:
    """`car-backend worker`: with --check, exit 0 when this host's worker is alive (1 otherwise); else run one."""
    if not args.check:
        from car_backend.worker.process import main

        return main(args, settings)
    alive, message = check(settings, args.name or socket.gethostname())
    print(message)
    if not settings.can_write_predictions:
        print(f"warning: {NO_WRITES}")
    return 0 if alive else 1
