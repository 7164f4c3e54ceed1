"""Versions: the engine fingerprint a worker must share with the server, and a project's model_version.

The model version is computed from settings, the project's parsed label config (`config_identity`: every
target with its labels and prompts, every override) and its calibration only, never from loaded models, so
/setup answers within milliseconds and /setup and /predict always agree. A project that adds a label, changes
a prompt or a control's settings gets a new version, so Label Studio asks again for every task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from car_backend import __version__
from car_backend.labelstudio.config import LabelSpec, ProjectConfig, Target
from car_backend.settings import Settings

# What engine_fingerprint covers (engine.config.EngineConfig.fingerprint): a worker must share these with the
# server (CAR_SAM_MODE and CAR_PROPOSALS only where they are not the default).
FINGERPRINT_SETTINGS = ("CAR_PROPOSAL_MODEL", "CAR_CLASSIFIER_MODEL", "CAR_SAM_CHECKPOINT", "CAR_SAM_MODEL_TYPE",
                        "CAR_MAX_STEPS", "CAR_COMPAT", "CAR_SAM_MODE", "CAR_PROPOSALS")
# ProjectConfig fields that change no stored prediction: why controls were skipped, and what only interactive
# calls read (their answers are not kept by version). Every other field, of the config, its targets and their
# labels, present and future, enters the version (`config_identity`).
NOT_OUTPUT = frozenset({"skipped", "prompt_from_name", "interactive_controls"})


def engine_fingerprint(settings: Settings) -> str:
    """The engine settings a worker must share with the server that computed a job's model_version."""
    return settings.engine_config().fingerprint()


def model_version(settings: Settings, config: ProjectConfig | None = None, generation: int = 0,
                  thresholds: Mapping[str, float] | None = None, fit_generation: int = 0, head: str = "") -> str:
    """`car-<package version>-<preset>-<hash>[-cal<generation>][-fit<fit_generation>]`; the hash covers
    everything that changes predictions, the calibrated thresholds and the adopted mask head (`head`, its
    reference with the digest of its weights) included. `config` None: the settings' own version (/health)."""
    preset = (config.preset if config else None) or settings.preset
    identity = {
        "engine": engine_fingerprint(settings),
        "preset": settings.preset,
        "output": settings.output,
        "polygon_tolerance": settings.polygon_tolerance,
        "score": settings.score,
        "task_labels_key": settings.task_labels_key,
        "config": config_identity(config) if config is not None else None,
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


def config_identity(config: ProjectConfig) -> dict[str, Any]:
    """What of a parsed label config changes a project's predictions, in a canonical form: every field of
    the config but `NOT_OUTPUT`, each target with all its fields (labels with their values and prompts).
    Fields at their default are left out, so a field added later with a default that keeps today's output
    keeps today's versions. Targets are sorted (the order of regions is not output), and so are the labels of
    a target that does not take its first label for referring sentences; a Label's colour, hotkey or the
    order of XML attributes are not parsed, so they do not enter."""
    identity = _fields(config, NOT_OUTPUT)
    identity["targets"] = sorted((_target(t) for t in config.targets), key=_canonical)
    return identity


def _target(target: Target) -> dict[str, Any]:
    identity = _fields(target)
    labels = [_fields(label) for label in target.labels]
    identity["labels"] = labels if target.referring_key else sorted(labels, key=_canonical)
    return identity


def _fields(item: ProjectConfig | Target | LabelSpec, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The dataclass `item`'s fields that differ from their default (targets and labels are replaced)."""
    found = {}
    for spec in dataclasses.fields(item):
        value = getattr(item, spec.name)
        if spec.name in skip or (spec.default is not dataclasses.MISSING and value == spec.default):
            continue
        found[spec.name] = value
    return found


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=list)
