"""Settings for tests and benchmarks: the tiny random CLIP on CPU, and the same Settings in a child process."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from car_backend.settings import Settings

TINY_CLIP_CONFIG = Path(__file__).resolve().parent / "tiny-clip.json"  # a small open_clip architecture
TINY_MODEL = f"{TINY_CLIP_CONFIG}:random"  # its model spec, with random weights
# Variables of ours that must not leak from the caller's environment into worker processes.
_OWN_PREFIXES = ("CAR_", "REDIS_URL", "LABEL_STUDIO_", "BASIC_AUTH_")


def tiny_settings(**overrides) -> Settings:
    """Settings with the tiny random CLIP on CPU (fast), plus `overrides`. The embedded Redis's data goes to
    a fresh temporary folder (CAR_DATA_DIR), never the user's cache that other runs may share. Precision is
    fp32, so that outcomes do not depend on whether the machine's CPU has native bf16 (what `auto` picks).
    Workers run no interactive lane (CAR_INTERACTIVE_LANE=off: one process per worker, so tests that count
    processes, kill workers or order jobs see one) unless `interactive_lane` says so."""
    values = {"proposal_model": TINY_MODEL, "classifier_model": TINY_MODEL, "device": "cpu", "max_steps": 3,
              "precision": "fp32", "data_dir": tempfile.mkdtemp(prefix="car-data-"), "interactive_lane": "off"}
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes `Settings.from_env()` in a child process equal `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    # Several workers share the machine's cores in these tests: one torch thread each (torch's default,
    # every core per process, oversubscribes them and slows everything down many times).
    env.setdefault("OMP_NUM_THREADS", "1")
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        env[f.metadata["setting"].env] = ",".join(value) if isinstance(value, tuple) else str(value)
    return env
