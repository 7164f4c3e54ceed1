"""Versions: the engine fingerprint a worker must share with the server, and a project's model_version.

The model version is computed from settings, the project's overrides and its calibration only, never from
loaded models, so /setup answers within milliseconds and /setup and /predict always agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from car_backend import __version__
from car_backend.labelstudio.config import ProjectConfig
from car_backend.settings import Settings

# What engine_fingerprint covers (engine.config.EngineConfig.fingerprint): a worker must share these with the
# server (CAR_SAM_MODE and CAR_PROPOSALS only where they are not the default).
FINGERPRINT_SETTINGS = ("CAR_PROPOSAL_MODEL", "CAR_CLASSIFIER_MODEL", "CAR_SAM_CHECKPOINT", "CAR_SAM_MODEL_TYPE",
                        "CAR_MAX_STEPS", "CAR_COMPAT", "CAR_SAM_MODE", "CAR_PROPOSALS")


def engine_fingerprint(settings: Settings) -> str:
    """The engine settings a worker must share with the server that computed a job's model_version."""
    return settings.engine_config().fingerprint()


def model_version(settings: Settings, config: ProjectConfig | None = None, generation: int = 0,
                  thresholds: Mapping[str, float] | None = None, fit_generation: int = 0, head: str = "") -> str:
    """`car-<package version>-<preset>-<hash>[-cal<generation>][-fit<fit_generation>]`; the hash covers
    everything that changes predictions, the calibrated thresholds and the adopted mask head (`head`, its
    reference with the digest of its weights) included."""
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
    if settings.regions != "semantic":  # only where set, so versions from before CAR_REGIONS stay as they were
        identity["regions"] = settings.regions
    calibrated = generation > 0
    if calibrated:
        identity["calibration"] = sorted((thresholds or {}).items())
    if fit_generation > 0:
        identity["head"] = head
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:10]
    suffix = f"-cal{generation}" if calibrated else ""
    suffix += f"-fit{fit_generation}" if fit_generation > 0 else ""
    return f"car-{__version__}-{preset}-{digest}{suffix}"

