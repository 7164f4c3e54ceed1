"""Engine test helpers: the tiny CLIP config, and the package's random-weight CLIPs and scenes."""

from __future__ import annotations

from car_backend.engine.synthetic import ATTENTION_SHARPNESS, random_clip, scene
from car_backend.testing.settings import TINY_CLIP_CONFIG

__all__ = ["ATTENTION_SHARPNESS", "TINY_CLIP_CONFIG", "random_clip", "scene"]
