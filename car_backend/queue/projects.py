"""What the backend remembers of each project between requests.

    car:project:<p>         JSON extra_params that /setup received for project p (/predict lacks them)
    car:projects:<instance> hash Label Studio project id -> the creation stamp last seen with it, so a caller
                            that names a project by its bare id (`/status?project=12`, a webhook without
                            `created_at`) reaches the project Label Studio calls 12 now
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from car_backend.pipeline.identity import ProjectId
from car_backend.queue.keys import PROJECT_TTL_S, KeyFamily


class ProjectRegistry:
    """The two key families above; `redis` passed in. Methods raise RedisError when Redis is unavailable."""

    PARAMS = KeyFamily("car:project:<p>", "ProjectRegistry", "PROJECT_TTL_S = 90 days")
    STAMPS = KeyFamily("car:projects:<instance>", "ProjectRegistry", "PROJECT_TTL_S after the last write")

    def __init__(self, redis: Redis):
        self.redis = redis

    def save_params(self, project: ProjectId, extra_params: Any) -> None:
        self.redis.set(self.PARAMS.key(project.key), json.dumps(extra_params), ex=PROJECT_TTL_S)

    def params(self, project: ProjectId) -> Any:
        raw = self.redis.get(self.PARAMS.key(project.key))
        return json.loads(raw) if raw is not None else None

    def seen(self, project: ProjectId) -> None:
        """Remember `project`'s creation stamp as the current one of its id (a known stamp only)."""
        if project.created is None:
            return
        key = self.STAMPS.key(project.instance)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, str(project.id), str(project.created))
            pipe.expire(key, PROJECT_TTL_S)
            pipe.execute()

    def resolve(self, project: ProjectId) -> ProjectId:
        """`project` with the creation stamp last seen for its id when it has none (unchanged otherwise, and
        when no stamp was ever seen)."""
        if project.created is not None:
            return project
        raw = self.redis.hget(self.STAMPS.key(project.instance), str(project.id))
        return project if raw is None else ProjectId(project.instance, project.id, int(raw))
