"""Per-project state of the server: the parsed label config, calibrated thresholds, the model_version.

The model version is computed from settings, the project's overrides and its calibration only, never from
loaded models, so /setup answers within milliseconds and /setup and /predict always agree. /predict does
not carry `extra_params` (only /setup does), so the server remembers them per project, in memory and in
Redis. A calibration (car_backend.review.jobs) is read from Redis at most every few seconds per project.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from redis import RedisError

from car_backend.labelstudio.config import config_hash, parse_label_config
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version, project_id
from car_backend.queue.store import Store
from car_backend.review.heads import FitStatus, HeadStore
from car_backend.review.store import Calibration, ReviewStore
from car_backend.settings import Settings

log = logging.getLogger(__name__)

CONFIG_CACHE_SIZE = 256
CALIBRATION_REFRESH_S = 5.0


class Projects:
    """The server's per-project cache: parsed configs (by config hash and calibration), the extra_params
    of each project's /setup, and calibrations (re-read every CALIBRATION_REFRESH_S).

    `store` and `review` wrap the process's one Redis client. `setup`/`for_predict` raise LabelConfigError
    for a config that cannot be used; Redis errors are logged and fall back to what is cached.
    """

    def __init__(self, settings: Settings, store: Store, review: ReviewStore | None = None):
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()
        self._parsed: OrderedDict[tuple, Project] = OrderedDict()
        self._params: dict[str, Any] = {}
        self._calibrations: dict[str, tuple[float, Calibration | None]] = {}
        self.review = review or ReviewStore(store.redis)
        self.heads = HeadStore(store.redis)
        self._fits: dict[str, tuple[float, FitStatus | None]] = {}

    def setup(self, project: Any, label_config: str, extra_params: Any) -> Project:
        """Parse (or reuse) the config of a /setup call and remember its extra_params for /predict."""
        pid = project_id(project)
        parsed = self._parse(label_config, extra_params, self._calibration(pid), self._fit(pid))
        if pid is not None:
            with self._lock:
                self._params[pid] = extra_params
            try:
                self.store.save_project_params(pid, extra_params)
            except RedisError as exc:
                log.warning("could not keep project %s's extra_params in Redis: %s", pid, exc)
        return _with_id(parsed, pid)

    def for_predict(self, project: Any, label_config: str) -> Project:
        """The config of a /predict call, with the extra_params its project's /setup sent."""
        pid = project_id(project)
        return _with_id(self._parse(label_config, self._extra_params(pid), self._calibration(pid), self._fit(pid)),
                        pid)

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

    def _fit(self, pid: str | None) -> FitStatus | None:
        """The project's mask-head status (review.heads), re-read like the calibration."""
        if pid is None:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._fits.get(pid)
        if cached is not None and now - cached[0] < CALIBRATION_REFRESH_S:
            return cached[1]
        try:
            status = self.heads.status(pid)
        except RedisError as exc:
            log.warning("could not read project %s's mask head from Redis: %s", pid, exc)
            return cached[1] if cached else None
        with self._lock:
            self._fits[pid] = (now, status)
        return status

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

    def _parse(self, label_config: str, extra_params: Any, calibration: Calibration | None,
               fit: FitStatus | None = None) -> Project:
        """LabelConfigError propagates; parsed configs are kept by config hash, calibration and mask head."""
        calibrated = calibration is not None and calibration.generation > 0
        thresholds = tuple(sorted(calibration.thresholds.items())) if calibrated else ()
        fit_generation, head = (fit.generation, fit.head) if fit is not None and fit.generation > 0 else (0, "")
        digest = (config_hash(label_config, extra_params), thresholds, calibration.generation if calibrated else 0,
                  head)
        with self._lock:
            if digest in self._parsed:
                self._parsed.move_to_end(digest)
                return self._parsed[digest]
        config = parse_label_config(label_config, extra_params)
        version = model_version(self.settings, config, calibration.generation if calibrated else 0,
                                calibration.thresholds if calibrated else None, fit_generation, head)
        project = Project(config=config, version=version,
                          thresholds=thresholds, head=head)
        with self._lock:
            self._parsed[digest] = project
            while len(self._parsed) > CONFIG_CACHE_SIZE:
                self._parsed.popitem(last=False)
        return project


def _with_id(project: Project, pid: str | None) -> Project:
    """`project` with Label Studio's project id, when `pid` is one (late writes are checked against it)."""
    return replace(project, ls_project=int(pid)) if pid is not None and pid.isdigit() else project
