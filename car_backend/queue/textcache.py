"""The engine's shared text-embedding cache on Redis: a vocabulary is encoded once per deployment.

    car:text:<sha1(M)[:12]>:<sha1(T)>   float32 bytes of text T's embedding by model M (CAR_TEXT_CACHE_TTL)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
from redis import Redis, RedisError

from car_backend.queue.keys import KeyFamily
from car_backend.queue.stats import CounterFamily, Stats, TextLookup

log = logging.getLogger(__name__)


class RedisTextCache:
    """The engine's SharedTextCache on Redis (`ttl`: CAR_TEXT_CACHE_TTL seconds). A Redis error is a miss (or
    a dropped write), never a failure; lookups are counted in `car:stats` (`text:hit`, `text:miss`)."""

    TEXT = KeyFamily("car:text:<sha1(M)[:12]>:<sha1(T)>", "RedisTextCache", "CAR_TEXT_CACHE_TTL (0 = not used)")

    def __init__(self, redis: Redis, ttl: int):
        self.redis = redis
        self.ttl = ttl
        self.stats = Stats(redis)

    @classmethod
    def key(cls, model: str, text: str) -> str:
        digest = hashlib.sha1
        return cls.TEXT.key(digest(model.encode()).hexdigest()[:12], digest(text.encode()).hexdigest())

    def get_many(self, model: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        try:
            raw = self.redis.mget([self.key(model, t) for t in texts])
            hits = sum(r is not None for r in raw)
            with self.redis.pipeline(transaction=False) as pipe:
                self.stats.count_in(pipe, CounterFamily.TEXT, TextLookup.HIT, hits)
                self.stats.count_in(pipe, CounterFamily.TEXT, TextLookup.MISS, len(texts) - hits)
                pipe.execute()
        except RedisError as exc:
            log.warning("text-embedding cache unavailable (%s); encoding the texts here", exc)
            return [None] * len(texts)
        return [np.frombuffer(r, dtype=np.float32) if r is not None else None for r in raw]

    def put_many(self, model: str, embeddings: dict[str, np.ndarray]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for text, vector in embeddings.items():
                    pipe.set(self.key(model, text), np.asarray(vector, dtype=np.float32).tobytes(), ex=self.ttl)
                pipe.execute()
        except RedisError as exc:
            log.warning("could not store text embeddings in Redis (%s)", exc)
