"""Engine test helpers: the tiny CLIP config, and the package's random-weight CLIPs and scenes."""

from __future__ import annotations

from pathlib import Path

from car_backend.engine.synthetic import ATTENTION_SHARPNESS, random_clip, scene

TINY_CLIP_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip.json"

__all__ = ["ATTENTION_SHARPNESS", "TINY_CLIP_CONFIG", "random_clip", "scene"]
