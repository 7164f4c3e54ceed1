"""Per-project state of the server: the parsed label config, calibrated thresholds, the model_version.

The model version is computed from settings, the project's overrides and its calibration only, never from
loaded models, so /setup answers within milliseconds and /setup and /predict always agree. /predict does
not carry `extra_params` (only /setup does), so the server remembers them per project, in memory and in
Redis. A calibration (car_backend.feedback) is read from Redis at most every few seconds per project.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from redis import RedisError

from car_backend import __version__
from car_backend.jobs import engine_fingerprint
from car_backend.labelstudio.config import ProjectConfig, config_hash, parse_label_config
from car_backend.review import Calibration, ReviewStore
from car_backend.settings import Settings
from car_backend.store import Store

log = logging.getLogger(__name__)

CONFIG_CACHE_SIZE = 256
CALIBRATION_REFRESH_S = 5.0


def model_version(settings: Settings, config: ProjectConfig | None = None,
                  calibration: Calibration | None = None) -> str:
    """`car-<package version>-<preset>-<hash>[-cal<generation>]`; the hash covers everything that changes
    predictions, the calibrated thresholds included."""
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
    calibrated = calibration is not None and calibration.generation > 0
    if calibrated:
        identity["calibration"] = sorted(calibration.thresholds.items())
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:10]
    suffix = f"-cal{calibration.generation}" if calibrated else ""
    return f"car-{__version__}-{preset}-{digest}{suffix}"


def project_id(raw: Any) -> str | None:
    """Label Studio sends "<id>.<created timestamp>"; the id is the part before the first dot."""
    if raw is None or str(raw).strip() == "":
        return None
    return str(raw).split(".", 1)[0]


@dataclass(frozen=True)
class Project:
    config: ProjectConfig
    version: str
    thresholds: tuple[tuple[str, float], ...] = ()  # calibrated preset values for every run of the project


class Projects:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()
        self._parsed: OrderedDict[tuple, Project] = OrderedDict()
        self._params: dict[str, Any] = {}
        self._calibrations: dict[str, tuple[float, Calibration | None]] = {}
        self.review = ReviewStore(store.redis, settings.result_ttl)

    def setup(self, project: Any, label_config: str, extra_params: Any) -> Project:
        """Parse (or reuse) the config of a /setup call and remember its extra_params for /predict."""
        pid = project_id(project)
        parsed = self._parse(label_config, extra_params, self._calibration(pid))
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
        pid = project_id(project)
        return self._parse(label_config, self._extra_params(pid), self._calibration(pid))

    def _calibration(self, pid: str | None) -> Calibration | None:
        if pid is None:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._calibrations.get(pid)
        if cached is not None and now - cached[0] < CALIBRATION_REFRESH_S:
            return cached[1]
        try:
            calibration = self.review.calibration(pid)
        except RedisError as exc:
            log.warning("could not read project %s's calibration from Redis: %s", pid, exc)
            return cached[1] if cached else None
        with self._lock:
            self._calibrations[pid] = (now, calibration)
        return calibration

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

    def _parse(self, label_config: str, extra_params: Any, calibration: Calibration | None) -> Project:
        """LabelConfigError propagates; parsed configs are kept by config hash and calibration."""
        calibrated = calibration is not None and calibration.generation > 0
        thresholds = tuple(sorted(calibration.thresholds.items())) if calibrated else ()
        digest = (config_hash(label_config, extra_params), thresholds, calibration.generation if calibrated else 0)
        with self._lock:
            if digest in self._parsed:
                self._parsed.move_to_end(digest)
                return self._parsed[digest]
        config = parse_label_config(label_config, extra_params)
        project = Project(config=config, version=model_version(self.settings, config, calibration),
                          thresholds=thresholds)
        with self._lock:
            self._parsed[digest] = project
            while len(self._parsed) > CONFIG_CACHE_SIZE:
                self._parsed.popitem(last=False)
        return project
