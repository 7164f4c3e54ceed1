"""Per-project state of the server: the parsed label config and the model_version string.

The model version is computed from settings and the project's overrides only, never from loaded models,
so /setup answers within milliseconds and /setup and /predict always agree. /predict does not carry
`extra_params` (only /setup does), so the server remembers them per project, in memory and in Redis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from redis import RedisError

from car_backend import __version__
from car_backend.jobs import engine_fingerprint
from car_backend.labelstudio.config import ProjectConfig, config_hash, parse_label_config
from car_backend.settings import Settings
from car_backend.store import Store

log = logging.getLogger(__name__)

CONFIG_CACHE_SIZE = 256


def model_version(settings: Settings, config: ProjectConfig | None = None) -> str:
    """`car-<package version>-<preset>-<hash>`; the hash covers everything that changes predictions."""
    preset = (config.preset if config else None) or settings.preset
    overrides = None
    if config is not None:
        overrides = {
            "preset": config.preset,
            "background": config.background,
            "output": config.output,
            "targets": sorted((t.from_name, t.to_name, t.preset, t.background) for t in config.targets
                              if t.preset or t.background),
        }
        overrides = {k: v for k, v in overrides.items() if v} or None  # none: the settings' own version
    identity = {
        "engine": engine_fingerprint(settings),
        "preset": settings.preset,
        "output": settings.output,
        "polygon_tolerance": settings.polygon_tolerance,
        "score": settings.score,
        "overrides": overrides,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:10]
    return f"car-{__version__}-{preset}-{digest}"


def project_id(raw: Any) -> str | None:
    """Label Studio sends "<id>.<created timestamp>"; the id is the part before the first dot."""
    if raw is None or str(raw).strip() == "":
        return None
    return str(raw).split(".", 1)[0]


@dataclass(frozen=True)
class Project:
    config: ProjectConfig
    version: str


class Projects:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()
        self._parsed: OrderedDict[str, Project] = OrderedDict()
        self._params: dict[str, Any] = {}

    def setup(self, project: Any, label_config: str, extra_params: Any) -> Project:
        """Parse (or reuse) the config of a /setup call and remember its extra_params for /predict."""
        parsed = self._parse(label_config, extra_params)
        pid = project_id(project)
        if pid is not None:
            with self._lock:
                self._params[pid] = extra_params
            try:
                self.store.save_project_params(pid, extra_params)
            except RedisError as exc:
                log.warning("could not keep project %s's extra_params in Redis: %s", pid, exc)
        return parsed

    def for_predict(self, project: Any, label_config: str) -> Project:
        """The config of a /predict call, with the extra_params its project's /setup sent."""
        return self._parse(label_config, self._extra_params(project_id(project)))

    def _extra_params(self, pid: str | None) -> Any:
        if pid is None:
            return None
        with self._lock:
            if pid in self._params:
                return self._params[pid]
        try:
            params = self.store.project_params(pid)
        except RedisError as exc:
            log.warning("could not read project %s's extra_params from Redis: %s", pid, exc)
            return None
        with self._lock:
            self._params[pid] = params
        return params

    def _parse(self, label_config: str, extra_params: Any) -> Project:
        """LabelConfigError propagates; parsed configs are kept by config hash."""
        digest = config_hash(label_config, extra_params)
        with self._lock:
            if digest in self._parsed:
                self._parsed.move_to_end(digest)
                return self._parsed[digest]
        config = parse_label_config(label_config, extra_params)
        project = Project(config=config, version=model_version(self.settings, config))
        with self._lock:
            self._parsed[digest] = project
            while len(self._parsed) > CONFIG_CACHE_SIZE:
                self._parsed.popitem(last=False)
        return project
