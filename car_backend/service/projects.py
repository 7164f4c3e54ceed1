"""Per-project state of the server: the project's identity, the parsed label config, calibrated thresholds,
the adopted mask head and the model_version.

A project is a `ProjectId`: this deployment's Label Studio (LABEL_STUDIO_URL), Label Studio's id and the
project's creation stamp (from "<id>.<created>" on the wire, `created_at` in webhook payloads; a caller that
gives the bare id gets the stamp last seen with it). The model version is computed from settings, the
project's overrides, its calibration and its mask head only, never from loaded models, so /setup answers
within milliseconds and /setup and /predict always agree. A config longer than CAR_MAX_LABEL_CONFIG_BYTES
is refused before anything is parsed or registered (RequestTooLarge, HTTP 413), and the parsed configs kept
are bounded in number (CONFIG_CACHE_SIZE) and in the bytes of their sources (CONFIG_CACHE_BYTES). /predict does not carry `extra_params` (only
/setup does), so the server remembers them per project, in memory and in Redis. A calibration
(review.calibration) and a mask head (review.fit) are read from Redis at most every few seconds per project.
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
from car_backend.pipeline.identity import ProjectId, instance_of
from car_backend.pipeline.spec import Project
from car_backend.pipeline.versions import model_version
from car_backend.queue.projects import ProjectRegistry
from car_backend.review.store import Calibration, FitStatus, ReviewStore
from car_backend.service.parsing import RequestTooLarge
from car_backend.settings import Settings

log = logging.getLogger(__name__)

CONFIG_CACHE_SIZE = 256
# A parsed config takes about 8 times its source's bytes: 8 MiB of sources is about 70 MB of parsed configs.
CONFIG_CACHE_BYTES = 8 * 1024 * 1024
CALIBRATION_REFRESH_S = 5.0


class Projects:
    """The server's per-project cache: parsed configs (by config hash, calibration and mask head), the
    extra_params of each project's /setup, and calibrations and mask-head statuses (re-read every
    CALIBRATION_REFRESH_S); the first time it sees a stamped project it adopts what an older version kept
    under the bare id (ReviewStore.adopt_legacy).

    `registry` and `review` wrap the process's one Redis client. `setup`/`for_predict` raise LabelConfigError
    for a config that cannot be used; Redis errors are logged and fall back to what is cached.
    """

    def __init__(self, settings: Settings, registry: ProjectRegistry, review: ReviewStore):
        self.settings = settings
        self.instance = instance_of(settings.label_studio_url)
        self.registry = registry
        self.review = review
        self._lock = threading.Lock()
        self._parsed: OrderedDict[tuple, tuple[Project, int]] = OrderedDict()  # digest -> (project, source bytes)
        self._parsed_bytes = 0
        self._params: dict[ProjectId, Any] = {}
        self._calibrations: dict[ProjectId, tuple[float, Calibration | None]] = {}
        self._fits: dict[ProjectId, tuple[float, FitStatus | None]] = {}
        self._seen: set[ProjectId] = set()  # stamped projects this process has registered

    def identify(self, raw: Any) -> ProjectId | None:
        """The project a /setup or /predict `project` field names ("<id>.<created>" or a bare id); None for no
        project. A bare id gets the creation stamp last seen with it; a stamped one is remembered."""
        return self._known(ProjectId.from_wire(raw, self.instance))

    def identify_api(self, project: dict) -> ProjectId | None:
        """The project a Label Studio project object (API, webhook payload) describes; None without an id."""
        return self._known(ProjectId.from_api(project, self.instance))

    def by_id(self, project: int) -> ProjectId:
        """The project Label Studio calls `project` now (`/status?project=ID`, command lines)."""
        return self._known(ProjectId(self.instance, project))

    def _known(self, pid: ProjectId | None) -> ProjectId | None:
        if pid is None:
            return None
        try:
            if pid.created is None:
                return self.registry.resolve(pid)
            with self._lock:
                if pid in self._seen:
                    return pid
            self.registry.seen(pid)
            self.review.adopt_legacy(pid)  # state an older version kept under the bare id, once
            with self._lock:
                self._seen.add(pid)
        except RedisError as exc:
            log.warning("could not look up project %s's identity in Redis: %s", pid, exc)
        return pid

    def setup(self, project: Any, label_config: str, extra_params: Any) -> Project:
        """Parse (or reuse) the config of a /setup call and remember its extra_params for /predict."""
        self._check_size(label_config)
        return self.setup_project(self.identify(project), label_config, extra_params)

    def setup_project(self, pid: ProjectId | None, label_config: str, extra_params: Any) -> Project:
        """`setup` for a project already identified (`prelabel --project`: from Label Studio's API)."""
        parsed = self._parse(label_config, extra_params, self._calibration(pid), self._fit(pid))
        if pid is not None:
            with self._lock:
                self._params[pid] = extra_params
            try:
                self.registry.save_params(pid, extra_params)
            except RedisError as exc:
                log.warning("could not keep project %s's extra_params in Redis: %s", pid, exc)
        return replace(parsed, project=pid)

    def for_predict(self, project: Any, label_config: str) -> Project:
        """The config of a /predict call, with the extra_params its project's /setup sent."""
        self._check_size(label_config)
        return self.for_project(self.identify(project), label_config)

    def for_project(self, pid: ProjectId | None, label_config: str) -> Project:
        """The config of project `pid`, with the extra_params its /setup sent."""
        return replace(self._parse(label_config, self._extra_params(pid), self._calibration(pid), self._fit(pid)),
                       project=pid)

    def _calibration(self, pid: ProjectId | None) -> Calibration | None:
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

    def _fit(self, pid: ProjectId | None) -> FitStatus | None:
        """The project's mask-head status (review.store.FitStatus), re-read like the calibration."""
        if pid is None:
            return None
        now = time.monotonic()
        with self._lock:
            cached = self._fits.get(pid)
        if cached is not None and now - cached[0] < CALIBRATION_REFRESH_S:
            return cached[1]
        try:
            status = self.review.fit_status(pid)
        except RedisError as exc:
            log.warning("could not read project %s's mask head from Redis: %s", pid, exc)
            return cached[1] if cached else None
        with self._lock:
            self._fits[pid] = (now, status)
        return status

    def _extra_params(self, pid: ProjectId | None) -> Any:
        if pid is None:
            return None
        with self._lock:
            if pid in self._params:
                return self._params[pid]
        try:
            params = self.registry.params(pid)
        except RedisError as exc:
            log.warning("could not read project %s's extra_params from Redis: %s", pid, exc)
            return None
        with self._lock:
            self._params[pid] = params
        return params

    def _check_size(self, label_config: str) -> int:
        """The config's size in bytes (UTF-8); RequestTooLarge above CAR_MAX_LABEL_CONFIG_BYTES."""
        limit = self.settings.max_label_config_bytes
        # every character is at least one byte: a config with too many characters is not encoded
        size = len(label_config) if len(label_config) > limit else len(label_config.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise RequestTooLarge(f"the label config is {size} bytes or more, more than "
                                  f"CAR_MAX_LABEL_CONFIG_BYTES={limit}")
        return size

    def _parse(self, label_config: str, extra_params: Any, calibration: Calibration | None,
               fit: FitStatus | None = None) -> Project:
        """LabelConfigError propagates, RequestTooLarge for a config over CAR_MAX_LABEL_CONFIG_BYTES; parsed
        configs are kept by config hash, calibration and mask head."""
        size = self._check_size(label_config)
        calibrated = calibration is not None and calibration.generation > 0
        thresholds = tuple(sorted(calibration.thresholds.items())) if calibrated else ()
        fit_generation, head = (fit.generation, fit.head) if fit is not None and fit.generation > 0 else (0, "")
        digest = (config_hash(label_config, extra_params), thresholds, calibration.generation if calibrated else 0,
                  head)
        with self._lock:
            if digest in self._parsed:
                self._parsed.move_to_end(digest)
                return self._parsed[digest][0]
        config = parse_label_config(label_config, extra_params)
        version = model_version(self.settings, config, calibration.generation if calibrated else 0,
                                calibration.thresholds if calibrated else None, fit_generation, head)
        project = Project(config=config, version=version,
                          thresholds=thresholds, head=head, label_hash=config_hash(label_config))
        with self._lock:
            if digest not in self._parsed:
                self._parsed[digest] = (project, size)
                self._parsed_bytes += size
            while len(self._parsed) > 1 and (len(self._parsed) > CONFIG_CACHE_SIZE
                                             or self._parsed_bytes > CONFIG_CACHE_BYTES):
                self._parsed_bytes -= self._parsed.popitem(last=False)[1][1]
        return project

